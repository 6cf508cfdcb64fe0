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
