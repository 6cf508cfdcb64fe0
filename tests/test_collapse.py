"""Collapse is measured, never inferred: how many classes a model predicts and how evenly
(``predicted_classes``, ``prediction_entropy``), per-class recall, the run log's warning, and
the compare report's columns (also for runs written before these keys existed)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tiny_overrides

from fedhello.model import evaluation
from fedhello.model.evaluation import warn_if_collapsed
from fedhello.store.runs import RunDir
from fedhello.tasks.base import (
    classification_scores,
    collapsed_class,
    per_class_recall,
    prediction_spread,
)


def _entropy(predictions: np.ndarray) -> float:
    """Shannon entropy (nats) of the predicted classes, independently: from a histogram."""
    counts = np.bincount(predictions)
    p = counts[counts > 0] / len(predictions)
    return float(np.sum(p * np.log(1 / p)))


def _recall(predictions: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, float]:
    out = {}
    for c, name in enumerate(names):
        n = int(np.sum(labels == c))
        if n:
            out[name] = round(int(np.sum((labels == c) & (predictions == c))) / n, 4)
    return out


@pytest.mark.parametrize(
    "predictions,classes,entropy",
    [
        (np.full(50, 2), 1, 0.0),  # one class: no spread at all
        (np.repeat(np.arange(4), 25), 4, math.log(4)),  # uniform over 4
        (np.repeat(np.arange(3), 7), 3, math.log(3)),  # uniform over 3
        (np.array([0, 0, 0, 1]), 2, None),  # skewed: checked against the histogram
    ],
)
def test_spread_equals_an_independent_computation(
    predictions: np.ndarray, classes: int, entropy: float | None
) -> None:
    got = prediction_spread(predictions)
    assert got["predicted_classes"] == classes == len(set(predictions.tolist()))
    want = _entropy(predictions) if entropy is None else entropy
    assert got["prediction_entropy"] == pytest.approx(want, abs=1e-4)
    assert got["prediction_entropy"] == pytest.approx(_entropy(predictions), abs=1e-4)
    assert math.copysign(1, got["prediction_entropy"]) == 1  # never -0.0


def test_classification_scores_keep_their_keys_first_and_values() -> None:
    rng = np.random.default_rng(0)
    predictions, labels = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    got = classification_scores(predictions, labels)
    assert list(got) == ["accuracy", "macro_f1", "predicted_classes", "prediction_entropy"]
    assert got["accuracy"] == float((predictions == labels).mean())


def test_per_class_recall_equals_a_hand_computation() -> None:
    names = ["neg", "neu", "pos", "unseen"]
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = np.array([0, 0, 1, 2, 1, 0, 2, 2, 2, 3])
    got = per_class_recall(predictions, labels, names)
    # by hand: neg 2 of 4, neu 1 of 2, pos 3 of 4; "unseen" has no test label: omitted
    assert got == {"neg": 0.5, "neu": 0.5, "pos": 0.75}
    assert got == _recall(predictions, labels, names)
    rng = np.random.default_rng(1)
    p, y = rng.integers(0, 5, 333), rng.integers(0, 5, 333)
    assert per_class_recall(p, y, list("abcde")) == _recall(p, y, list("abcde"))


def test_the_warning_fires_on_a_collapsed_prediction_set_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    labels = np.repeat(np.arange(4), 25)  # balanced: the majority label holds 25%
    collapsed = np.where(np.arange(100) < 85, 1, 0)  # class 1 gets 85% of the predictions
    with caplog.at_level(logging.WARNING, logger="fedhello.model.evaluation"):
        assert warn_if_collapsed(collapsed, labels, "the test split", ["a", "b", "c", "d"])
    lines = [r for r in caplog.records if r.name == "fedhello.model.evaluation"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    message = lines[0].getMessage()
    assert "collapse on the test split" in message and "'b'" in message and "85%" in message
    assert "\n" not in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedhello.model.evaluation"):
        assert not warn_if_collapsed(labels.copy(), labels, "the test split")  # balanced
        assert not warn_if_collapsed(np.where(np.arange(100) < 79, 1, 0), labels, "x")  # 79%
        # a skewed test split whose majority label is predicted mostly: no evidence of collapse
        skewed = np.where(np.arange(100) < 60, 1, 0)
        assert not warn_if_collapsed(np.full(100, 1), skewed, "x")
        assert not warn_if_collapsed(np.array([], dtype=np.int64), np.array([]), "x")
    assert not [r for r in caplog.records if r.name == "fedhello.model.evaluation"]
    assert collapsed_class(collapsed, labels) == (1, 0.85, 0.25)


def test_a_tiny_run_records_the_measures(
    tmp_path: Path,
    tiny_bert_dir: Path,
    tiny_text_csv: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One round: the round's record and summary.json hold the measures, equal to an
    independent computation from the predictions evaluated; the warning reaches the run log
    (the rule made to fire on anything, to see it applied to the round and the final test)."""
    from fedhello.cli import main
    from fedhello.tasks import base

    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def spy(predictions: np.ndarray, labels: np.ndarray) -> Any:
        seen.append((predictions.copy(), labels.copy()))
        return base.collapsed_class(predictions, labels)

    monkeypatch.setattr(evaluation, "collapsed_class", spy)
    monkeypatch.setattr(base, "COLLAPSE_SHARE", 0.0)
    monkeypatch.setattr(base, "COLLAPSE_MAJORITY", 1.01)
    out = tmp_path / "run"
    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', federation__rounds=1)  # fmt: skip
    args = ["run", "--out", str(out)]
    for o in ov:
        args += ["--set", o]
    with caplog.at_level(logging.WARNING, logger="fedhello.model.evaluation"):
        assert main(args) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedhello.model.evaluation"]
    assert any("the round's evaluation subset" in m for m in warnings), warnings
    assert any("the whole test split (final)" in m for m in warnings), warnings
    assert len(seen) == 2  # the round's evaluation subset, then the whole test split

    run = RunDir(out)
    names = json.loads((run.adapter_dir / "labels.json").read_text())
    (record,) = run.read_metrics()
    preds, _ = seen[0]
    assert record["eval_examples"] == len(preds)
    assert record["predicted_classes"] == len(np.unique(preds))
    assert record["prediction_entropy"] == pytest.approx(_entropy(preds), abs=1e-4)
    summary = run.read_summary()
    preds, labels = seen[1]
    assert summary["test_examples"] == len(preds)
    assert summary["predicted_classes"] == len(np.unique(preds))
    assert 1 <= summary["predicted_classes"] <= summary["num_classes"]
    assert summary["prediction_entropy"] == pytest.approx(_entropy(preds), abs=1e-4)
    assert summary["per_class_recall"] == _recall(preds, labels, names)
    assert summary["test_accuracy"] == float((preds == labels).mean())  # unchanged metric


def _fake_run(root: Path, partition: str, strategy: str, seed: int, **extra: Any) -> None:
    """A finished run's files as the report reads them: summary.json and metrics.jsonl."""
    path = root / "runs" / partition / strategy / f"seed{seed}"
    path.mkdir(parents=True)
    client = {"tier": 0, "train_memory_mb": 10.0}
    records = [
        {"round": r, "test_accuracy": 0.5, "val_accuracy": 0.5, "clients": [client]} for r in (1, 2)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"test_accuracy": 0.5, "test_macro_f1": 0.4, "client_seconds": 1.0,
               "bytes_up": 1e6, "bytes_down": 2e6, "num_classes": 4, **extra}  # fmt: skip
    (path / "summary.json").write_text(json.dumps(summary))


def test_the_report_shows_collapse_and_renders_older_runs(tmp_path: Path) -> None:
    from fedhello.studies.report import summarize
    from fedhello.studies.results import collect, group
    from fedhello.studies.tables import write_tables

    root = tmp_path / "cmp"
    _fake_run(root, "dirichlet", "fedra", 0, predicted_classes=1, prediction_entropy=0.0)
    _fake_run(root, "dirichlet", "fedra", 1, predicted_classes=3, prediction_entropy=1.0)
    _fake_run(root, "dirichlet", "full", 0)  # written before the keys existed
    table = {r["strategy"]: r for r in summarize(group(collect(root)))}
    assert table["fedra"]["pred_classes_min"] == 1
    assert table["fedra"]["pred_entropy_mean"] == pytest.approx(0.5)
    assert table["full"]["pred_classes_min"] is None
    assert table["full"]["pred_entropy_mean"] is None
    write_tables(list(table.values()), tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "predicted classes (min) / entropy" in md
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if "dirichlet" in line}
    assert rows["fedra"].endswith("| 1 of 4 / 0.50 |")
    assert rows["full"].endswith("| - / - |")
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"pred_classes_min", "pred_entropy_mean"} <= set(header)


def test_a_comparison_reads_the_cells_it_links_from_another(tmp_path: Path) -> None:
    """Comparisons share cells by symlink (a reference, a baseline's runs): the report reads
    them like its own. (A recursive glob skipped linked folders, and a published table lost
    its centralised row without a word.)"""
    from fedhello.studies.results import REFERENCE_PARTITION, collect

    other, root = tmp_path / "other", tmp_path / "cmp"
    _fake_run(other, "dirichlet", "fedra", 0)
    (other / "runs" / "centralized").mkdir(parents=True)
    (other / "runs" / "dirichlet" / "fedra" / "seed0").rename(
        other / "runs" / "centralized" / "seed0"
    )
    _fake_run(other, "dirichlet", "fedra", 1)
    _fake_run(root, "dirichlet", "fed-hello", 0)
    (root / "runs" / "centralized").symlink_to(Path("../../other/runs/centralized"))
    (root / "runs" / "dirichlet" / "fedra").symlink_to(other / "runs" / "dirichlet" / "fedra")
    got = sorted((r.partition, r.strategy, r.seed) for r in collect(root))
    assert got == [
        (REFERENCE_PARTITION, "centralized", 0),
        ("dirichlet", "fed-hello", 0),
        ("dirichlet", "fedra", 1),
    ]


def test_memory_by_tier_keeps_each_value_under_its_tier() -> None:
    """A strategy whose lower tiers never trained (Exclusive) shows ``-`` there, not its top
    tier's value under tier 0; the centralised reference (one client) shows its value alone."""
    from fedhello.studies.tables import tier_cell

    table = [
        {"partition": "dirichlet", "train_mb_by_tier": {0: 150.0, 1: 156.8, 2: 160.2}},
        {"partition": "dirichlet", "train_mb_by_tier": {2: 160.3}},
        {"partition": "all", "train_mb_by_tier": {0: 160.2}},
    ]
    assert [tier_cell(r, table) for r in table] == [
        "150.0 / 156.8 / 160.2",
        "- / - / 160.3",
        "160.2",
    ]
