"""The real pretrained MiniLM-L6 on the real WordNet data: a short federation, and the exported
adapter reloaded with plain PEFT reproduces the reported accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import peft_test_accuracy

from fedhello.cli import main
from fedhello.model.loading import resolve_model_source
from fedhello.store.runs import RunDir

pytestmark = pytest.mark.slow


def test_minilm_on_wordnet_learns_and_exports_a_peft_adapter(tmp_path: Path) -> None:
    out = tmp_path / "minilm"
    overrides = {
        "clients.num_clients": 6, "clients.per_round": 3, "federation.rounds": 3,
        "train.local_steps": 8, "data.partition": "iid", "data.max_train_examples": 3000,
        "data.test_fraction": 0.01, "federation.eval_examples": 200, "allocation.strategy": "fedra",
    }  # fmt: skip
    args = ["run", "--out", str(out)]
    for k, v in overrides.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    summary = RunDir(out).read_summary()
    assert summary["num_classes"] == 26 and summary["test_examples"] == 821
    assert summary["test_accuracy"] > 3 / 26  # three times chance after 24 local steps
    records = RunDir(out).read_metrics()
    budgets = sorted({c["budget"] for r in records for c in r["clients"]})
    assert set(budgets) <= {3, 5, 6}

    source = resolve_model_source("minilm-l6", False)
    assert peft_test_accuracy(out, source) == pytest.approx(summary["test_accuracy"])


def test_mpnet_12_not_installed_is_one_line_naming_the_make_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDHELLO_MODELS", str(tmp_path))
    assert main(["run", "--out", str(tmp_path / "run"), "--set", 'model.name="mpnet-12"']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make mpnet-12" in err and "not installed" in err


def test_mpnet_12_has_twelve_lora_layers_on_its_real_weights() -> None:
    """The layer map of all-mpnet-base-v2 (installed by ``make mpnet-12``): LoRA on the
    attention's q and v of each of its 12 blocks, block i's tensors mapped to layer i."""
    from fedhello.model.source import mpnet_dir

    if not (mpnet_dir() / "config.json").is_file():
        pytest.skip(f"mpnet-12 is not installed ({mpnet_dir()}): run `make mpnet-12` once")
    from collections import Counter

    from fedhello.core.config import load_config
    from fedhello.engine.node import build_lora_classifier
    from fedhello.model.accelerator import resolve
    from fedhello.model.source import model_shape

    cfg = load_config(None, ['model.name="mpnet-12"'])
    assert model_shape(resolve_model_source("mpnet-12", False)) == ("text", 12)
    labels = [f"c{i}" for i in range(4)]
    _, _model, keys, layer_of = build_lora_classifier(
        cfg, labels, "text", 12, resolve("cpu", "fp32", "fp32")
    )
    per_layer = Counter(v for v in layer_of.values() if v is not None)
    assert sorted(per_layer) == list(range(12))
    assert set(per_layer.values()) == {4}  # q and v, A and B
    for key, layer in layer_of.items():
        if layer is not None:
            assert f"layer.{layer}.attention.attn." in key and (".q." in key or ".v." in key)
    assert any(layer_of[k] is None for k in keys)  # the head, averaged by every client
