"""``fedhello eval RUN --lm-eval TASKS``: a finished tiny-Llama run scored by EleutherAI's
lm-eval, offline. The ready ``fedhello_heldout`` task gives, answer for answer, what fedhello's
own generation gave on the same held-out prompts (``generations.jsonl``, ``summary.json``); a
user's local task file in ``--include`` is scored as an independent log-likelihood computation
says; the merged model is reused while the adapter is unchanged; every refusal is one line
with exit code 2."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import crash_after, lm_overrides, tiny_overrides

from fedhello.cli import main
from fedhello.core.config import load_config

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (make install)")

TEST_ROWS = 12  # the toy's test split
GENERATED = 8  # federation.generate_examples: the summary's prompts, 8 of the 12


def _run_args(out: Path, overrides: list[str]) -> list[str]:
    return ["run", "--out", str(out), *[a for o in overrides for a in ("--set", o)]]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path,
           tiny_alpaca_jsonl: Path) -> Path:  # fmt: skip
    """A finished 2-round tiny-Llama run (fp32), evaluated in place by the tests below; 8
    local steps, so that some held-out answers are exact and some not; greedy answers to 8 of
    the 12 test prompts in its summary (all 8 in generations.jsonl)."""
    out = tmp_path_factory.mktemp("lm-eval") / "run"
    ov = lm_overrides(tiny_llama_dir, tiny_alpaca_jsonl, train__local_steps=8,
                      federation__generate_examples=GENERATED)  # fmt: skip
    assert main(_run_args(out, ov)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["test_exact_match"] < 1  # else exact match would agree trivially
    return out


def _samples(run: Path, task: str) -> list[dict[str, Any]]:
    lines = (run / "lm-eval" / f"samples_{task}.jsonl").read_text().splitlines()
    return sorted((json.loads(x) for x in lines), key=lambda s: s["doc_id"])


def _encoded(run: Path, model_dir: Path) -> tuple[Any, Any]:
    """(raw data, its encoding) as fedhello's training reads the run's data."""
    from transformers import AutoTokenizer

    from fedhello.data.encoding import encode
    from fedhello.data.loading import load_raw
    from fedhello.tasks import task_for

    cfg = load_config(run / "config.toml")
    raw = load_raw(cfg.data, task_for("causal-lm"), False)
    return raw, encode(raw, AutoTokenizer.from_pretrained(model_dir), cfg.model.max_length)


def test_the_heldout_task_answers_as_fedhello_did(
    lm_run: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The task's rows are the test split, the summary's 8 prompts first, each prompt exactly
    the training example's prefix; --limit 4: lm-eval's answers are fedhello's own
    (generations.jsonl), scored the same; --limit 8 reproduces the summary's exact match and
    ROUGE-L, with the merged model reused, not merged again."""
    args = ["eval", str(lm_run), "--lm-eval", "fedhello_heldout"]
    assert main([*args, "--limit", "4"]) == 0
    assert "fedhello_heldout" in capsys.readouterr().out  # the table
    result = json.loads((lm_run / "lm-eval" / "results.json").read_text())
    assert result["tasks"] == ["fedhello_heldout"]
    assert result["lm_eval_version"] == lm_eval.__version__
    assert result["n-samples"]["fedhello_heldout"]["effective"] == 4

    raw, data = _encoded(lm_run, tiny_llama_dir)
    generations = (lm_run / "generations.jsonl").read_text().splitlines()
    fedhello_answers = {s["row"]: s for s in map(json.loads, generations)}
    assert len(fedhello_answers) == GENERATED
    task_file = lm_run / "lm-eval" / "tasks" / "fedhello_heldout.jsonl"
    rows = [json.loads(x) for x in task_file.read_text().splitlines()]
    test = sorted(int(i) for i in raw.splits["test"])
    assert len(test) == TEST_ROWS
    assert [r["row"] for r in rows] == sorted(fedhello_answers) + sorted(
        set(test) - set(fedhello_answers)
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for r in rows:
        assert tok(r["prompt"], add_special_tokens=False)["input_ids"] == data.prompt_ids(r["row"])
        assert r["answer"] == data.references[r["row"]]

    samples = _samples(lm_run, "fedhello_heldout")
    assert len(samples) == 4
    for s in samples:
        mine = fedhello_answers[s["doc"]["row"]]
        assert s["filtered_resps"][0].strip() == mine["answer"]
        assert s["rouge_l"] == pytest.approx(mine["rouge_l"], abs=5e-5)
    scores = result["results"]["fedhello_heldout"]
    assert scores["rouge_l,none"] == pytest.approx(sum(s["rouge_l"] for s in samples) / 4)

    model_file = lm_run / "lm-eval" / "model" / "model.safetensors"
    written = model_file.stat().st_mtime_ns
    assert main([*args, "--limit", str(GENERATED)]) == 0
    result = json.loads((lm_run / "lm-eval" / "results.json").read_text())
    summary = json.loads((lm_run / "summary.json").read_text())
    assert summary["generated_examples"] == GENERATED
    assert result["n-samples"]["fedhello_heldout"]["effective"] == GENERATED
    scores = result["results"]["fedhello_heldout"]
    assert scores["exact_match,none"] == pytest.approx(summary["test_exact_match"])
    assert scores["rouge_l,none"] == pytest.approx(summary["test_rouge_l"], rel=1e-9)
    assert model_file.stat().st_mtime_ns == written  # reused: the adapter is unchanged


def test_a_local_task_file_in_include_is_scored(
    lm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's loglikelihood task (JSONL + YAML) in --include: lm-eval's perplexity equals
    exp(-mean log-likelihood) of each answer after its question, computed here with plain
    transformers on the merged model."""
    docs = [
        {"question": "Define the word dog.", "answer": "a kind of animal"},
        {"question": "What is a bus?", "answer": "a kind of vehicle"},
    ]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "mine.yaml").write_text(
        "task: my_words\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(tmp_path / 'mine.jsonl'))}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: question\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: perplexity\n"
        "    aggregation: perplexity\n    higher_is_better: false\n"
    )
    args = ["eval", str(lm_run), "--lm-eval", "my_words", "--include", str(tmp_path), "--json"]
    assert main(args) == 0
    result = json.loads((lm_run / "lm-eval" / "results.json").read_text())
    out = capsys.readouterr().out
    assert json.loads(out) == result  # --json: the same object
    assert result["tasks"] == ["my_words"]
    got = result["results"]["my_words"]["perplexity,none"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = lm_run / "lm-eval" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    lls = []
    for d in docs:  # lm-eval's target delimiter is a space
        ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
        ids = tok(d["question"] + " " + d["answer"], add_special_tokens=False)["input_ids"]
        assert ids[: len(ctx)] == ctx
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        lls.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids))))
    assert got == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)


def _refused(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedhello: error: "), err
    return err


def test_refusals_are_one_line(
    lm_run: Path,
    tmp_path: Path,
    tiny_bert_dir: Path,
    tiny_text_csv: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = ["--lm-eval", "fedhello_heldout"]
    unfinished = crash_after(lm_run, tmp_path / "crashed", 1)
    assert "has not finished" in _refused(capsys, ["eval", str(unfinished), *held])

    classifier = tmp_path / "classifier"  # a finished text classifier's folder, as it matters
    (classifier / "adapter").mkdir(parents=True)
    (classifier / "adapter" / "adapter_config.json").write_text("{}")
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, tiny_text_csv))  # model.task auto
    (classifier / "config.toml").write_text(cfg.to_toml())
    err = _refused(capsys, ["eval", str(classifier), *held])
    assert "model.task = 'text'" in err and "allowed: a causal-lm run" in err

    missing = str(tmp_path / "no-such-folder")
    err = _refused(capsys, ["eval", str(lm_run), *held, "--include", missing])
    assert f"--include {missing!r} is not a folder" in err

    err = _refused(capsys, ["eval", str(lm_run), "--lm-eval", "fedhello_heldout,no_such_task"])
    assert "'no_such_task'" in err and "'fedhello_heldout'" not in err
    assert str((lm_run / "lm-eval" / "tasks").resolve()) in err and "bundled" in err

    tasks = tmp_path / "tasks"  # a task file whose data is not there
    tasks.mkdir()
    lost = tmp_path / "lost.jsonl"
    (tasks / "lost.yaml").write_text(
        f"task: lost\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        f"{json.dumps(str(lost))}\ntest_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: q\ndoc_to_target: a\n"
    )
    err = _refused(capsys, ["eval", str(lm_run), "--lm-eval", "lost", "--include", str(tasks)])
    assert "cannot read a task's data" in err and str(lost) in err

    assert "--limit 0" in _refused(capsys, ["eval", str(lm_run), *held, "--limit", "0"])
    err = _refused(capsys, ["eval", str(lm_run), *held, "--batch-size", "-1"])
    assert "--batch-size -1: allowed: a positive number" in err

    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # as if not installed
    err = _refused(capsys, ["eval", str(lm_run), *held])
    assert "pip install 'fedhello[lm-eval]'" in err


BOS = "<|im_start|>"  # the BOS of the tokenizer bos_run's merged model has (SmolLM2's, too)


@pytest.fixture(scope="module")
def bos_run(lm_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lm_run copied, its merged model's tokenizer made one that adds a BOS (``<|im_start|>``)
    to every text, as Llama's, Mistral's and Gemma's do; the model reused while the adapter is
    unchanged, so lm-eval reads this tokenizer."""
    import shutil

    from tokenizers import processors
    from transformers import AutoTokenizer

    from fedhello.lm_eval_run import merged_model
    from fedhello.store.runs import RunDir

    out = tmp_path_factory.mktemp("lm-eval-bos") / "run"
    shutil.copytree(lm_run, out, ignore=shutil.ignore_patterns("lm-eval"))
    model_dir = merged_model(RunDir(out))
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.bos_token = BOS
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.bos_token_id)]
    )
    tok.save_pretrained(model_dir)
    again = AutoTokenizer.from_pretrained(model_dir)
    plain = again("What is a bus ?")["input_ids"]
    assert plain == [
        again.bos_token_id,
        *again("What is a bus ?", add_special_tokens=False)["input_ids"],
    ]
    return out


def _rolling_lls(run: Path, texts: list[str], prefix: int) -> list[float]:
    """Reference: each text's log-likelihood, token by token after ``prefix`` and the tokens
    before, the text's tokens as written (no special tokens added; one leading BOS that it
    writes itself is the prefix, not a scored token), plain transformers on the merged model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = run / "lm-eval" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    lls = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = ids if ids[0] == prefix else [prefix, *ids]
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        lls.append(sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids))))
    return lls


def test_a_rolling_task_scores_each_text_after_exactly_one_bos(
    lm_run: Path, bos_run: Path, tmp_path: Path
) -> None:
    """A loglikelihood_rolling task (perplexity over whole texts): with a tokenizer that adds a
    BOS, each text, with or without the BOS written, is scored after one BOS, the BOS itself
    not a scored token (lm-eval 0.4.13's ``hf`` model scores BOS after BOS); a tokenizer
    without a BOS (lm_run's) has lm-eval's EOS prefix, one, as before."""
    texts = ["What is a bus ?", f"{BOS}user Define the word dog ."]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "texts.yaml").write_text(
        "task: my_texts\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(tmp_path / 'texts.jsonl'))}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: text\nmetric_list:\n  - metric: word_perplexity\n"
    )
    from transformers import AutoTokenizer

    for run, bos in ((bos_run, True), (lm_run, False)):
        args = ["eval", str(run), "--lm-eval", "my_texts", "--include", str(tmp_path)]
        assert main(args) == 0
        tok = AutoTokenizer.from_pretrained(run / "lm-eval" / "model")
        assert (tok.bos_token_id is not None) == bos
        prefix = tok.bos_token_id if bos else tok.eos_token_id  # lm-eval's prefix_token_id
        got = [s["resps"][0][0] for s in _samples(run, "my_texts")]
        want = _rolling_lls(run, texts, prefix)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
        result = json.loads((run / "lm-eval" / "results.json").read_text())
        words = sum(len(t.split()) for t in texts)
        assert result["results"]["my_texts"]["word_perplexity,none"] == pytest.approx(
            math.exp(-sum(want) / words), rel=1e-5
        )


def test_a_generation_batch_mixing_bos_and_plain_prompts_gives_each_one_bos(
    bos_run: Path,
) -> None:
    """The model fedhello hands lm-eval (``harness_model``) generates from each prompt's own
    tokens in a batch holding prompts written with the BOS and prompts without (the
    tokenizer's BOS added): one BOS each, whichever prompt leads the batch (lm-eval 0.4.13's
    ``hf`` model lets the first decide for all, giving the others none or two)."""
    from lm_eval.api.instance import Instance
    from transformers import AutoTokenizer

    from fedhello.lm_eval_model import harness_model

    model_dir = bos_run / "lm-eval" / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = harness_model({"pretrained": str(model_dir), "dtype": "float32"}, 2, "cpu")
    contexts: list[list[int]] = []
    generate = lm._model_generate

    def spy(context: torch.Tensor, max_length: int, stop: list[str], **kw: Any) -> Any:
        for row, mask in zip(context.tolist(), kw["attention_mask"].tolist(), strict=True):
            contexts.append([t for t, m in zip(row, mask, strict=True) if m])
        return generate(context, max_length, stop, **kw)

    lm._model_generate = spy
    written = f"{BOS}user What is a dog ?<|im_end|>{BOS}assistant"  # ChatML, BOS-led
    for plain in (
        "What is a bus ?",
        "Tell me what bus means . Explain the word bus . Describe bus .",
    ):
        contexts.clear()
        gen = {"until": ["<|im_end|>"], "max_gen_toks": 2, "do_sample": False}
        lm.generate_until([Instance("generate_until", {}, (p, gen), i)
                           for i, p in enumerate([written, plain])])  # fmt: skip
        want = [tok(written, add_special_tokens=False)["input_ids"], tok(plain)["input_ids"]]
        assert [w.count(tok.bos_token_id) for w in want] == [2, 1]  # written: 2 turns
        assert want[1][0] == want[0][0] == tok.bos_token_id
        assert sorted(contexts) == sorted(want)
