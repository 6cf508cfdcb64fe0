"""``fedhello.store.rerun``: what a rerun must reproduce, the machine's measurements aside."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedhello.model.report import REPORT
from fedhello.store import rerun
from fedhello.store.rerun import MACHINE_FIELDS, run_differences, without_machine


def record(**overrides: Any) -> dict[str, Any]:
    """A round's record shaped like metrics.jsonl's: a client entry and per-class recall."""
    rec: dict[str, Any] = {
        "round": 1,
        "round_seconds": 41.2,
        "eval_seconds": 3.1,
        "test_accuracy": 0.781,
        "per_class_recall": {"noun.time": 0.5, "noun.act": 0.75},
        "clients": [
            {"client": 3, "seconds": 12.5, "step_seconds": 0.2, "peak_memory_mb": 900.1,
             "train_memory_mb": 69.2, "step_limit_seconds": None, "train_loss": 1.25},
        ],
    }  # fmt: skip
    rec.update(overrides)
    return rec


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """The differences left once each side's machine measurements are set aside."""
    return rerun.differences(without_machine(a), without_machine(b), where)


def write_run(folder: Path, records: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_machine_fields_go_at_every_depth_and_nothing_else() -> None:
    stripped = without_machine([record()])[0]
    assert set(stripped) == {"round", "test_accuracy", "per_class_recall", "clients"}
    client = stripped["clients"][0]
    # train_memory_mb is the computation's (saved tensors, grads, moments); the limit is config
    assert client == {"client": 3, "train_memory_mb": 69.2, "step_limit_seconds": None,
                      "train_loss": 1.25}  # fmt: skip


def test_timings_differ_freely_metrics_do_not() -> None:
    slower = record(round_seconds=99.0, clients=[dict(record()["clients"][0], seconds=80.0)])
    assert differences(record(), slower) == []
    # a class whose name ends in "time" is a metric, not a timing
    recall = record(per_class_recall={"noun.time": 0.25, "noun.act": 0.75})
    assert differences(record(), recall, "r") == ["r.per_class_recall.noun.time: 0.5 != 0.25"]
    # nor is a class named like a timing field: recall per class is compared whole
    named = {"seconds": 0.5, "noun.act": 0.75}
    assert differences(record(per_class_recall=named), record(per_class_recall=dict(
        named, seconds=0.0)), "r") == ["r.per_class_recall.seconds: 0.5 != 0.0"]  # fmt: skip
    assert without_machine(record(per_class_recall=named))["per_class_recall"] == named
    assert differences(record(), record(test_accuracy=0.7810000000000001), "r") == [
        "r.test_accuracy: 0.781 != 0.7810000000000001"
    ]
    heavier = record(clients=[dict(record()["clients"][0], train_memory_mb=92.1)])
    assert differences(record(), heavier, "r") == ["r.clients[0].train_memory_mb: 69.2 != 92.1"]
    extra = record(repairs=[])
    assert differences(record(), extra, "r") == ["r.repairs: only in the second"]
    assert differences(record(), record(clients=[]), "r") == ["r.clients: 1 items != 0"]


def test_runs_compare_records_and_summaries_provenance_aside(tmp_path: Path) -> None:
    summary = {
        "test_accuracy": 0.78, "wall_seconds": 100.0, "code": {"commit": "abc"},
        "model_source": "/a/model", "resumed_at_round": None, "torch_threads": 1,
    }  # fmt: skip
    a = write_run(tmp_path / "a", [record(), record(round=2)], summary)
    rerun = dict(summary, wall_seconds=250.0, code={"commit": "def"}, model_source="/b/model",
                 resumed_at_round=1)  # fmt: skip
    b = write_run(tmp_path / "b", [record(), record(round=2)], rerun)
    assert run_differences(a, b) == ([], True)
    threads = write_run(tmp_path / "c", [record(), record(round=2)], dict(summary, torch_threads=2))
    assert run_differences(a, threads) == (["summary.torch_threads: 1 != 2"], True)
    short = write_run(tmp_path / "d", [record()], summary)
    assert run_differences(a, short) == (["2 records != 1"], False)
    # a metrics.jsonl file alone: the records only
    assert run_differences(a / "metrics.jsonl", threads / "metrics.jsonl") == ([], False)


def test_every_timing_or_peak_a_client_reports_is_set_aside() -> None:
    """A field added to the client's report in seconds, or as a memory peak, is the machine's:
    leaving it out of ``MACHINE_FIELDS`` would make every rerun check fail on it."""
    timed = {f.name for f in REPORT if f.unit == "s" or f.name.endswith("peak_memory_mb")}
    assert timed == {"seconds", "cpu_seconds", "step_seconds", "peak_memory_mb",
                     "device_peak_memory_mb"}  # fmt: skip
    assert timed <= MACHINE_FIELDS
