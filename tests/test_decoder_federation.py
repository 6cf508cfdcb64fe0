"""Decoder LLMs federated end to end (``model.task = "causal-lm"``): a tiny Llama and a tiny
Qwen2 train 2 rounds through the CLI under a layer strategy (Fed-HeLLo with Fisher scores), a
rank method (HetLoRA) and FedRA's subnetwork client; the records and the summary are a language
model's (loss, perplexity, ROUGE-L, exact match, the zero-shot reference; no accuracy), the
model learns the toy, a 1-block client trains and uploads only its block, the adapter is plain
PEFT and reproduces the run's scores, the merged export serves a text-generation pipeline, a
resumed run and the Flower simulation equal the embedded run. Scores are checked against
independent computations: each example alone through plain transformers/PEFT, a hand-written
greedy loop, rouge-score."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import crash_after, lm_overrides
from helpers import CHATML, greedy_answer, response_nll
from safetensors.numpy import load_file

from fedhello.cli import main
from fedhello.core.config import load_config
from fedhello.store.rerun import without_machine
from fedhello.store.runs import RunDir

KINDS = ("llama", "qwen2")
METHODS: dict[str, dict[str, object]] = {
    "fed-hello": {"allocation__strategy": '"fed-hello"', "allocation__fisher_warmup": 1,
                  "allocation__fisher_every": 1},
    "hetlora": {"allocation__strategy": '"hetlora"', "allocation__rank_penalty": 0.5},
    "fedra-subnetwork": {"allocation__strategy": '"fedra"',
                         "allocation__client_model": '"subnetwork"'},
}  # fmt: skip
BLOCK = re.compile(r"\.layers\.(\d+)\.")  # a decoder block's tensor, parsed independently
TEST_ROWS = 12  # 10% of the toy's 120 rows


def _args(out: Path, overrides: list[str], *extra: str) -> list[str]:
    return ["run", "--out", str(out), *extra, *[a for o in overrides for a in ("--set", o)]]


@pytest.fixture(scope="module")
def model_dirs(tiny_llama_dir: Path, tiny_qwen2_dir: Path) -> dict[str, Path]:
    return {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path], tiny_alpaca_jsonl: Path
) -> Callable[[str, str], Path]:
    """The finished embedded run of (decoder, method), run once per module (read it, don't
    change it)."""
    done: dict[tuple[str, str], Path] = {}

    def get(kind: str, method: str) -> Path:
        if (kind, method) not in done:
            out = tmp_path_factory.mktemp(f"{kind}-{method}") / "run"
            ov = lm_overrides(model_dirs[kind], tiny_alpaca_jsonl, **METHODS[method])
            assert main(_args(out, ov)) == 0
            done[kind, method] = out
        return done[kind, method]

    return get


def _encoded(run: Path, model_dir: Path) -> tuple[Any, Any, Any]:
    """(raw data, its encoding, tokenizer) as the run's config reads them."""
    from transformers import AutoTokenizer

    from fedhello.data.encoding import encode
    from fedhello.data.loading import load_raw
    from fedhello.tasks import task_for

    cfg = load_config(run / "config.toml")
    raw = load_raw(cfg.data, task_for("causal-lm"), False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return raw, encode(raw, tok, cfg.model.max_length), tok


def _perplexity(model: Any, data: Any, rows: np.ndarray) -> tuple[float, int]:
    """(perplexity, answer tokens) of ``rows``, each example alone (helpers.response_nll)."""
    scored = [response_nll(model, data.tokens(int(i)), int(data.prompt_lengths[i])) for i in rows]
    tokens = sum(n for _, n in scored)
    return math.exp(sum(s for s, _ in scored) / tokens), tokens


def _finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x)


# -- records and summary ----------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", KINDS)
def test_a_decoder_federation_records_a_language_models_scores(
    kind: str, method: str, runs: Callable[[str, str], Path]
) -> None:
    run = RunDir(runs(kind, method))
    records = run.read_metrics()
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        for key in ("test_loss", "test_perplexity", "val_loss", "val_perplexity", "train_loss"):
            assert _finite(r[key]), (key, r[key])
        assert r["test_perplexity"] == pytest.approx(math.exp(r["test_loss"]))
        assert r["eval_examples"] == TEST_ROWS and r["eval_subset"] is False
        assert not {"test_accuracy", "test_macro_f1", "predicted_classes"} & set(r)
        assert all(c["accepted"] for c in r["clients"])
    # federation.generate_every = 2: round 2 generates, round 1 does not
    assert "test_rouge_l" not in records[0] and "test_exact_match" not in records[0]
    assert 0 <= records[1]["test_rouge_l"] <= 1 and 0 <= records[1]["test_exact_match"] <= 1

    summary = run.read_summary()
    assert not {"test_accuracy", "test_macro_f1", "per_class_recall"} & set(summary)
    for key in ("test_loss", "test_perplexity", "test_rouge_l", "test_exact_match",
                "zero_shot_rouge_l", "zero_shot_exact_match"):  # fmt: skip
        assert _finite(summary[key]), (key, summary[key])
    assert summary["test_examples"] == summary["generated_examples"] == TEST_ROWS
    # round 2's model is the final one, scored on the same (whole) test split and prompts
    assert summary["test_perplexity"] == pytest.approx(records[1]["test_perplexity"], rel=1e-9)
    assert summary["test_rouge_l"] == pytest.approx(records[1]["test_rouge_l"], rel=1e-9)
    zero_shot = json.loads((run.path / "zero_shot.json").read_text())
    assert zero_shot["rouge_l"] == summary["zero_shot_rouge_l"]
    assert zero_shot["generated"] == TEST_ROWS
    samples = [json.loads(x) for x in (run.path / "generations.jsonl").read_text().splitlines()]
    assert len(samples) == summary["generated_examples"]  # every answer, to score again
    from fedhello.model.generation import normalise

    exact = [normalise(s["answer"]) == normalise(s["reference"]) for s in samples]
    assert sum(exact) / len(exact) == pytest.approx(summary["test_exact_match"])
    assert all(set(s) == {"row", "prompt", "reference", "answer", "rouge_l"} for s in samples)
    assert [s["row"] for s in samples] == sorted(s["row"] for s in samples)

    # the toy is learnt: the clients' loss falls from round 1 to round 2, and the answers are
    # closer to the references than the base model's (ROUGE-L 0.5-0.8 against 0-0.1)
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert summary["test_rouge_l"] > summary["zero_shot_rouge_l"] + 0.1
    if method == "fed-hello":  # Fisher scores from round 2 (warm-up 1): one per block
        assert records[0]["layer_scores"] is None
        scores = records[1]["layer_scores"]
        assert len(scores) == 4 and all(math.isfinite(s) and s > 0 for s in scores)
        assert records[1]["fisher_seconds"] >= 0
    if method == "hetlora":  # tiers 1/4, 1/2, 1 of rank 16: heterogeneous ranks
        assert len({c["rank"] for c in records[0]["clients"]}) > 1
        assert all(c["layers"] == [0, 1, 2, 3] for r in records for c in r["clients"])
    if method == "fedra-subnetwork":
        assert summary["strategy"] == "fedra"
    if method != "hetlora":  # a client trains exactly as many blocks as its budget
        assert all(len(c["layers"]) == c["budget"] for r in records for c in r["clients"])


def test_the_generation_subset_is_fixed_test_prompts_the_same_for_every_strategy(
    model_dirs: dict[str, Path], tiny_alpaca_jsonl: Path, tmp_path: Path
) -> None:
    """``federation.generate_examples = 5`` of the 12 test rows: the zero-shot reference and
    the final answers are of the same 5 rows, whatever the strategy and seed."""
    rows = []
    for method, seed in (("fed-hello", 0), ("fedra-subnetwork", 1)):
        out = tmp_path / method
        ov = lm_overrides(model_dirs["llama"], tiny_alpaca_jsonl, federation__rounds=1,
                          federation__generate_examples=5, run__seed=seed,
                          **METHODS[method])  # fmt: skip
        assert main(_args(out, ov)) == 0
        summary = RunDir(out).read_summary()
        assert summary["generated_examples"] == 5 and summary["test_examples"] == TEST_ROWS
        zero = json.loads((out / "zero_shot.json").read_text())
        final = [json.loads(x)["row"] for x in (out / "generations.jsonl").read_text().splitlines()]
        assert [s["row"] for s in zero["samples"]] == final
        rows.append(final)
    raw, _, _ = _encoded(tmp_path / "fed-hello", model_dirs["llama"])
    assert rows[0] == rows[1] == sorted(set(rows[0])) and len(rows[0]) == 5
    assert set(rows[0]) <= set(raw.splits["test"].tolist())


@pytest.mark.parametrize("method", ["fed-hello", "fedra-subnetwork"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_client_uploads_exactly_its_blocks_lora(
    kind: str, method: str, runs: Callable[[str, str], Path]
) -> None:
    """Each client's upload is the size of its blocks' LoRA tensors in the saved adapter
    (the 1-block client's: one block's), counted from the file."""
    run = runs(kind, method)
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    per_block = [0] * 4
    for key, value in adapter.items():
        match = BLOCK.search(key)
        assert match and "lora_" in key, key  # nothing but the blocks' LoRA (no head)
        per_block[int(match.group(1))] += value.nbytes
    clients = [c for r in RunDir(run).read_metrics() for c in r["clients"]]
    assert any(c["budget"] == 1 for c in clients)
    for c in clients:
        assert c["bytes_up"] == sum(per_block[b] for b in c["layers"])
        assert c["bytes_down"] == sum(per_block)


@pytest.mark.parametrize("kind", KINDS)
def test_a_one_block_client_trains_and_uploads_only_that_block(
    kind: str, model_dirs: dict[str, Path], runs: Callable[[str, str], Path]
) -> None:
    """Local training with the spec of a 1-block budget (block 2): the upload is block 2's
    LoRA tensors, every one changed; every other tensor of the model, LoRA or base, is as it
    was."""
    from fedhello.core.layers import AdapterSpec, layer_of_keys
    from fedhello.model.accelerator import resolve
    from fedhello.model.loading import load_model
    from fedhello.model.lora import adapter_keys, build_lora_model, get_state, set_state
    from fedhello.model.training import LocalTask, Shard, train_client

    run = runs(kind, "fed-hello")
    raw, data, _ = _encoded(run, model_dirs[kind])
    cfg = load_config(run / "config.toml")
    torch.manual_seed(0)
    loaded = load_model(str(model_dirs[kind]), raw.label_names, "causal-lm")
    model = build_lora_model(loaded.model, 4, 8, 0.0, ["auto"])
    keys = adapter_keys(model)
    rng = np.random.default_rng(1)
    state = {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype)  # non-zero B: all have grads
             for k, v in get_state(model, keys).items()}  # fmt: skip
    set_state(model, state)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = LocalTask(0, 1, AdapterSpec((2,)), 0.01, 0)
    shard = Shard(data, raw.splits["train"][:32])
    result = train_client(model, layer_of_keys(keys, 4), shard, task, state, cfg.train,
                          resolve("cpu", "fp32", "fp32"))  # fmt: skip
    block_2 = {k for k in keys if (m := BLOCK.search(k)) and m.group(1) == "2"}
    assert len(block_2) == 8  # A and B of q, k, v, o
    assert set(result.update.tensors) == block_2
    assert all(not np.array_equal(result.update.tensors[k], state[k]) for k in block_2)
    for name, p in model.named_parameters():
        if name not in block_2:
            torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_fisher_scores_of_a_decoder_are_per_example_answer_gradients(
    kind: str, model_dirs: dict[str, Path], runs: Callable[[str, str], Path]
) -> None:
    """Fed-HeLLo's layer scores on a decoder, batched with right padding (prompts of 5 to 8
    words): each example alone, the gradient of its answer tokens' summed NLL (shifted by
    hand) w.r.t. each block's LoRA factors, squared, summed per block, averaged."""
    from fedhello.core.layers import layer_of_keys
    from fedhello.model.fisher import fisher_scores
    from fedhello.model.loading import load_model
    from fedhello.model.lora import adapter_keys, build_lora_model, get_state, set_state

    run = runs(kind, "fed-hello")
    raw, data, _ = _encoded(run, model_dirs[kind])
    torch.manual_seed(0)
    model = build_lora_model(load_model(str(model_dirs[kind]), raw.label_names).model,
                             4, 8, 0.0, ["auto"])  # fmt: skip
    keys = adapter_keys(model)
    rng = np.random.default_rng(1)
    set_state(model, {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype)
                      for k, v in get_state(model, keys).items()})  # fmt: skip
    idx = raw.splits["train"][:10]
    assert len({len(data.tokens(int(i))) for i in idx}) > 1  # padded batches
    got = fisher_scores(model, data, idx, layer_of_keys(keys, 4), 4, batch_size=4)

    params = {n: p for n, p in model.named_parameters() if n in set(keys)}
    assert len(params) == 32  # A and B of 4 projections in 4 blocks
    want = np.zeros(4)
    model.eval()
    for i in idx:
        tokens, p = data.tokens(int(i)), int(data.prompt_lengths[i])
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
        loss = torch.nn.functional.cross_entropy(
            logits[p - 1 : -1], torch.tensor(tokens[p:]), reduction="sum"
        )
        for (name, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values())),
                                strict=True):  # fmt: skip
            match = BLOCK.search(name)
            assert match
            want[int(match.group(1))] += float(g.double().pow(2).sum())
    np.testing.assert_allclose(got, want / len(idx), rtol=1e-4)


# -- the adapter, with plain PEFT --------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", KINDS)
def test_the_adapter_loads_with_plain_peft_and_reproduces_the_scores(
    kind: str, method: str, runs: Callable[[str, str], Path], model_dirs: dict[str, Path]
) -> None:
    """The base model alone scores the zero-shot reference and a higher perplexity; with the
    run's adapter (plain PEFT) it gives the summary's test perplexity, example by example,
    and the answers of generations.jsonl by hand-written greedy decoding and by ``generate``."""
    from peft import PeftModel
    from rouge_score import rouge_scorer
    from transformers import AutoModelForCausalLM

    run = runs(kind, method)
    summary = RunDir(run).read_summary()
    raw, data, tok = _encoded(run, model_dirs[kind])
    test = raw.splits["test"]
    assert len(test) == TEST_ROWS
    base = AutoModelForCausalLM.from_pretrained(model_dirs[kind], dtype=torch.float32).eval()
    base_ppl, _ = _perplexity(base, data, test)
    # zero-shot: the base model's greedy answers to the test prompts, rouge-score's ROUGE-L
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    answers = [greedy_answer(base, tok, data.prompt_ids(int(i)), 6) for i in test]
    refs = [data.references[int(i)] for i in test]
    zero = [scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, refs, strict=True)]
    assert summary["zero_shot_rouge_l"] == pytest.approx(float(np.mean(zero)))

    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    ppl, tokens = _perplexity(model, data, test)
    assert summary["test_tokens"] == tokens
    assert summary["test_perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert summary["test_perplexity"] < 0.5 * base_ppl  # learnt: the base is near-uniform
    table = pd.read_json(load_config(run / "config.toml").data.name, lines=True)
    for sample in (json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()):
        i = sample["row"]
        assert i in set(test.tolist()) and sample["reference"] == table["output"][i]
        prompt = data.prompt_ids(i)
        assert greedy_answer(model, tok, prompt, 6) == sample["answer"]
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6,
                                 do_sample=False, eos_token_id=tok.eos_token_id)  # fmt: skip
        said = tok.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()
        assert said == sample["answer"]


# -- the merged export -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_merged_export_serves_a_text_generation_pipeline(
    kind: str, runs: Callable[[str, str], Path], model_dirs: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """``fedhello export --merged``: a plain causal LM (no LoRA tensors) with its tokenizer
    and chat template, whose pipeline answers a chat message as the run's final model did
    (generations.jsonl), and whose logits are the PEFT model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    run = runs(kind, "fed-hello")
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merged", str(out)]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in weights)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    # served with the base's config: the cache on, no label names of the training data
    assert merged.config.use_cache is True and merged.config.num_labels == 2
    assert type(merged).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[kind]
    base = AutoModelForCausalLM.from_pretrained(model_dirs[kind], dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    _, data, _ = _encoded(run, model_dirs[kind])
    batch = data.batch(np.arange(6))
    batch.pop("labels")
    with torch.inference_mode():
        torch.testing.assert_close(merged(**batch).logits, peft(**batch).logits,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip

    generate = pipeline("text-generation", model=str(out))
    table = pd.read_json(load_config(run / "config.toml").data.name, lines=True)
    samples = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    for sample in samples[:4]:
        chat = [{"role": "user", "content": table["instruction"][sample["row"]]}]
        reply = generate(chat, max_new_tokens=6, do_sample=False)[0]["generated_text"]
        assert reply[:-1] == chat and reply[-1]["role"] == "assistant"
        assert reply[-1]["content"].strip() == sample["answer"]


# -- resume and the Flower simulation ----------------------------------------------------------

SCORES = ("test_loss", "test_perplexity", "test_rouge_l", "test_exact_match",
          "zero_shot_rouge_l", "zero_shot_exact_match", "test_tokens")  # fmt: skip


def _same_adapter(a: Path, b: Path) -> None:
    x = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    y = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,method", [("llama", "fed-hello"), ("qwen2", "hetlora")])
def test_a_decoder_run_resumed_after_round_1_equals_the_uninterrupted_one(
    kind: str, method: str, runs: Callable[[str, str], Path], tmp_path: Path
) -> None:
    """The resumed run does not measure the zero-shot reference again (zero_shot.json is
    read back, untouched) and ends with the uninterrupted run's records, adapter, answers."""
    ref = runs(kind, method)
    crashed = crash_after(ref, tmp_path / "crashed", 1)
    (crashed / "generations.jsonl").unlink()  # the finish writes it again
    zero_shot = crashed / "zero_shot.json"
    stamp = zero_shot.stat().st_mtime_ns
    assert main(["run", "--resume", str(crashed)]) == 0
    assert zero_shot.stat().st_mtime_ns == stamp
    ours = [without_machine(r) for r in RunDir(crashed).read_metrics()]
    assert ours == [without_machine(r) for r in RunDir(ref).read_metrics()]
    _same_adapter(ref, crashed)
    a, b = RunDir(ref).read_summary(), RunDir(crashed).read_summary()
    assert {k: b[k] for k in SCORES} == {k: a[k] for k in SCORES}
    assert b["resumed_at_round"] == 2
    gen = (crashed / "generations.jsonl").read_text()
    assert gen == (ref / "generations.jsonl").read_text()
    # a zero_shot.json cut short by a crash is measured again, to the same answers
    again = crash_after(ref, tmp_path / "cut", 1)
    (again / "zero_shot.json").write_text('{"rouge_l": 0.1')
    assert main(["run", "--resume", str(again)]) == 0
    assert json.loads((again / "zero_shot.json").read_text()) == json.loads(
        (ref / "zero_shot.json").read_text()
    )


@pytest.mark.slow
def test_the_flower_simulation_of_a_decoder_equals_embedded(
    runs: Callable[[str, str], Path], model_dirs: dict[str, Path], tiny_alpaca_jsonl: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Fed-HeLLo with Fisher scores on the tiny Llama: the same records (timing apart),
    adapter, scores, zero-shot reference and answers on Flower's simulation engine."""
    emb = runs("llama", "fed-hello")
    sim = tmp_path / "sim"
    ov = lm_overrides(model_dirs["llama"], tiny_alpaca_jsonl, **METHODS["fed-hello"])
    assert main(_args(sim, ov, "--engine", "flower-sim")) == 0
    ours = [without_machine(r) for r in RunDir(sim).read_metrics()]
    assert ours == [without_machine(r) for r in RunDir(emb).read_metrics()]
    _same_adapter(emb, sim)
    a, b = RunDir(emb).read_summary(), RunDir(sim).read_summary()
    assert {k: b[k] for k in SCORES} == {k: a[k] for k in SCORES}
    assert b["engine"] == "flower"
    for name in ("zero_shot.json", "generations.jsonl"):
        assert (sim / name).read_text() == (emb / name).read_text()
