"""Where a causal-lm run meets the rest of fedhello: a one-class training pool refused by any
partition but IID (also when a cached dataset is reused), a site file without the category
column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedhello.core.config import DataConfig
from fedhello.core.errors import DataError
from fedhello.data.partition import partition_indices
from fedhello.data.site import load_site_raw
from fedhello.tasks import CausalLMTask

ROWS = [{"instruction": f"Define the word {w}.", "output": "a word"} for w in ["dog", "cat"] * 10]


@pytest.mark.parametrize("scheme", ["dirichlet", "pathological"])
def test_one_class_cannot_be_split_by_label(scheme: str) -> None:
    """The partition itself refuses: a cached label-less dataset reused with another
    partition never reaches the loader's check."""
    with pytest.raises(DataError) as err:
        partition_indices(np.zeros(40, dtype=np.int64), 4, scheme, seed=0, classes_per_client=1)
    assert str(err.value).startswith(f"data.partition = '{scheme}': the training pool has one")
    shards = partition_indices(np.zeros(40, dtype=np.int64), 4, "iid", seed=0)
    assert sorted(np.concatenate(shards).tolist()) == list(range(40))


def test_a_site_file_without_the_category_column_is_the_first_class(tmp_path: Path) -> None:
    path = tmp_path / "site.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    raw = load_site_raw(str(path), DataConfig(name="x", label_column="category"), CausalLMTask(),
                        ["noun.animal", "noun.artifact"])  # fmt: skip
    assert raw.labels.tolist() == [0] * len(ROWS)
    assert len(raw.inputs) == len(ROWS)
    # with the column, its values map onto the federation's classes as for a classifier
    path.write_text("".join(json.dumps(dict(r, category="noun.artifact")) + "\n" for r in ROWS))
    raw = load_site_raw(str(path), DataConfig(name="x", label_column="category"), CausalLMTask(),
                        ["noun.animal", "noun.artifact"])  # fmt: skip
    assert raw.labels.tolist() == [1] * len(ROWS)


def _llama_with_lora(checkpointing: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedhello.model.lora import build_lora_model, enable_checkpointing

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, use_cache=False,
    ))  # fmt: skip
    model = build_lora_model(base, 4, 8.0, 0.0, ["auto"])
    with torch.no_grad():  # B non-zero, so the LoRA path carries gradient to A
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    if checkpointing:
        enable_checkpointing(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less() -> None:
    """Training only the top two blocks: the same loss and LoRA gradients with checkpointing,
    fewer bytes saved for backward (the meter the memory profile reads), and the blocks
    below the lowest trained one still get no gradient."""
    from fedhello.model.meters import SavedTensorMeter

    out = {}
    for checkpointing in (False, True):
        model, batch = _llama_with_lora(checkpointing)
        model.train()
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name and (".layers.2." in name or ".layers.3." in name))
        meter = SavedTensorMeter(model)
        with meter.hooks():
            loss = model(**batch).loss
        meter.step_done()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[checkpointing] = (float(loss.detach()), grads, meter.peak)
    (loss0, g0, kept0), (loss1, g1, kept1) = out[False], out[True]
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert sorted(g1) == sorted(g0) and all(".layers.2." in n or ".layers.3." in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7)
    assert 0 < kept1 < kept0


def test_gradient_checkpointing_runs_no_backward_below_the_lowest_trained_block() -> None:
    """The frozen blocks below the lowest trained one produce outputs that need no gradient,
    with checkpointing as without: a weak client still does less work."""
    model, batch = _llama_with_lora(checkpointing=True)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name and ".layers.2." in name)
    needs_grad: dict[int, bool] = {}
    blocks = model.get_base_model().model.layers
    hooks = [
        block.register_forward_hook(
            lambda m, i, out, k=k: needs_grad.__setitem__(
                k, (out[0] if isinstance(out, tuple) else out).requires_grad
            )
        )
        for k, block in enumerate(blocks)
    ]
    try:
        model(**batch).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert needs_grad == {0: False, 1: False, 2: True, 3: True}


def test_the_last_rounds_answers_are_the_summarys_not_generated_twice(
    tmp_path: Path, tiny_llama_dir: Path, tiny_alpaca_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """generate-every = 2 of 2 rounds: round 2's answers are the final model's; the summary
    reuses them (greedy generation twice on the same model and prompts gives the same)."""
    from conftest import lm_overrides

    import fedhello.engine.generative as gen
    from fedhello.cli import main
    from fedhello.store.runs import RunDir

    calls = []
    real = gen.generation_scores

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generation_scores", counted)
    out = tmp_path / "run"
    args = ["run", "--out", str(out)]
    for o in lm_overrides(tiny_llama_dir, tiny_alpaca_jsonl):
        args += ["--set", o]
    assert main(args) == 0
    assert len(calls) == 2  # the zero-shot reference, round 2; not the summary again
    run = RunDir(out)
    assert run.read_summary()["test_rouge_l"] == run.read_metrics()[-1]["test_rouge_l"]
    assert (out / "generations.jsonl").read_text().strip()  # the reused answers' samples
