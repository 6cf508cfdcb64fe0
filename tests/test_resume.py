"""Resume after a crash: SIGKILL mid-run, resume, identical result; damaged checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides
from safetensors.numpy import load_file

from fedhello.cli import main
from fedhello.core.errors import RunDirError
from fedhello.store.checkpoint import load_latest, save_checkpoint
from fedhello.store.rerun import without_machine
from fedhello.store.runs import RunDir

ROUNDS = 6


def _overrides(model: Path, data: Path, precision: str = "auto") -> list[str]:
    return tiny_overrides(
        model, data, data__text_column='"sentence"', data__label_column='"topic"',
        federation__rounds=ROUNDS, federation__server_momentum=0.5,
        allocation__strategy='"fed-hello"', allocation__fisher_warmup=1,
        allocation__fisher_every=2, train__local_steps=6, train__precision=f'"{precision}"',
    )  # fmt: skip


def _cmd(out: Path, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "fedhello.cli", "run", "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _adapter(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(
    precision: str, tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    ov = _overrides(tiny_bert_dir, tiny_text_csv, precision)
    ref = tmp_path / "ref"
    assert main(["run", "--out", str(ref)] + [a for o in ov for a in ("--set", o)]) == 0

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(_cmd(crashed, ov), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # kill once round 3 is checkpointed: some rounds done, some not
        while not (crashed / "checkpoints" / "round-000003.json").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (crashed / "summary.json").exists()
    assert main(["run", "--resume", str(crashed)]) == 0

    ref_metrics = [without_machine(r) for r in RunDir(ref).read_metrics()]
    assert [without_machine(r) for r in RunDir(crashed).read_metrics()] == ref_metrics
    a, b = _adapter(ref), _adapter(crashed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    summary = RunDir(crashed).read_summary()
    assert summary["test_accuracy"] == RunDir(ref).read_summary()["test_accuracy"]
    assert summary["precision"] == precision  # and every client trained in it
    assert {c["precision"] for r in RunDir(crashed).read_metrics() for c in r["clients"]} == {
        precision
    }
    # a finished run resumed again recomputes nothing
    before = (crashed / "metrics.jsonl").read_bytes()
    assert main(["run", "--resume", str(crashed)]) == 0
    assert (crashed / "metrics.jsonl").read_bytes() == before


def test_a_resumed_runs_wall_seconds_are_the_whole_runs(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """Every checkpoint keeps the run's wall time up to it, and a resumed run's summary adds its
    own process's to the one it resumed from: the run's total, not the last process's alone."""
    import json

    from conftest import crash_after

    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', federation__rounds=3)  # fmt: skip
    ref = tmp_path / "ref"
    assert main(["run", "--out", str(ref), *[x for o in ov for x in ("--set", o)]]) == 0
    total = RunDir(ref).read_summary()["wall_seconds"]
    walls = [json.loads((ref / "checkpoints" / f"round-00000{r}.json").read_text())["wall_seconds"]
             for r in (2, 3)]  # fmt: skip
    assert 0 < walls[0] <= walls[1] <= total
    crashed = crash_after(ref, tmp_path / "crashed", 2)
    path = crashed / "checkpoints" / "round-000002.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"wall_seconds": 1000.0}))
    t0 = time.perf_counter()
    assert main(["run", "--resume", str(crashed)]) == 0
    own = time.perf_counter() - t0  # this process's time, at most
    summary = RunDir(crashed).read_summary()
    assert summary["resumed_at_round"] == 3  # what the summary says of the resume is kept
    assert 1000.0 < summary["wall_seconds"] <= 1000.0 + own + 0.01
    last = json.loads((crashed / "checkpoints" / "round-000003.json").read_text())
    assert 1000.0 < last["wall_seconds"] <= summary["wall_seconds"]


def test_a_checkpoints_wall_time_is_read_back_and_a_missing_one_is_none(tmp_path: Path) -> None:
    import json

    save_checkpoint(tmp_path, 1, _state(), {}, {}, "h", wall_seconds=12.345)
    ckpt = load_latest(tmp_path, "h", {"a", "b"})
    assert ckpt is not None and ckpt.wall_seconds == 12.35  # kept to 2 decimals
    save_checkpoint(tmp_path, 2, _state(), {}, {}, "h")  # as before checkpoints kept it
    ckpt = load_latest(tmp_path, "h", {"a", "b"})
    assert ckpt is not None and ckpt.round == 2 and ckpt.wall_seconds is None
    meta = tmp_path / "round-000002.json"
    for odd in ("12", True, -1.0):  # a timing that is no count of seconds: unrecorded
        meta.write_text(json.dumps(json.loads(meta.read_text()) | {"wall_seconds": odd}))
        ckpt = load_latest(tmp_path, "h", {"a", "b"})
        assert ckpt is not None and ckpt.round == 2 and ckpt.wall_seconds is None


def _state() -> dict[str, np.ndarray]:
    return {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    s = _state()
    save_checkpoint(folder, 1, s, {}, {"scores": None}, "h")
    s2 = {k: v + 1 for k, v in s.items()}
    save_checkpoint(folder, 2, s2, {"velocity/a": s["a"]}, {"scores": [1.0]}, "h")
    ck = load_latest(folder, "h", {"a", "b"})
    assert ck is not None and ck.round == 2 and ck.strategy_state == {"scores": [1.0]}
    assert ck.state.keys() == {"a", "b"} and ck.optimizer_state.keys() == {"velocity/a"}
    np.testing.assert_array_equal(ck.optimizer_state["velocity/a"], s["a"])
    path = folder / "round-000002.safetensors"
    path.write_bytes(path.read_bytes()[:-7])  # truncated on disk
    ck = load_latest(folder, "h", {"a", "b"})
    assert ck is not None and ck.round == 1
    np.testing.assert_array_equal(ck.state["a"], s["a"])
    (folder / "round-000001.json").write_text("{not json")
    with pytest.raises(RunDirError, match=r"every checkpoint .* is damaged"):
        load_latest(folder, "h", {"a", "b"})


def test_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, _state(), {}, {}, "config-one")
    with pytest.raises(RunDirError, match="another config"):
        load_latest(tmp_path, "config-two", {"a", "b"})
    with pytest.raises(RunDirError, match="another config"):
        load_latest(tmp_path, "config-one", {"a", "c"})


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    for r in range(1, 6):
        save_checkpoint(tmp_path, r, _state(), {}, {}, "h", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round-000004.json", "round-000004.safetensors",
        "round-000005.json", "round-000005.safetensors",
    ]  # fmt: skip


def test_resume_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a fedhello run" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "--set", "federation.rounds=3"]) == 2
    assert "own config.toml" in capsys.readouterr().err


def test_a_damaged_checkpoint_record_falls_back_too(tmp_path: Path) -> None:
    """JSON that reads but is not a checkpoint's record (a list; no tensor checksum; no
    round) is damaged like unreadable JSON: the previous checkpoint is used, no traceback."""
    folder = tmp_path / "ck"
    save_checkpoint(folder, 1, _state(), {}, {}, "h")
    save_checkpoint(folder, 2, _state(), {}, {}, "h")
    meta = folder / "round-000002.json"
    good = meta.read_text()
    for damaged in ("[]", good.replace('"tensors_sha256"', '"other"'),
                    good.replace('"round": 2', '"round": "two"')):  # fmt: skip
        meta.write_text(damaged)
        ck = load_latest(folder, "h", {"a", "b"})
        assert ck is not None and ck.round == 1


def test_a_resume_on_other_threads_is_said_and_kept(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint records the device type and torch threads its rounds ran with; a resume
    with others warns, keeps ``machine_changed`` in the summary, and ``compare`` will not
    take the run for one computed on a single machine."""
    import json
    import logging

    from conftest import crash_after

    import fedhello.cli as cli

    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', federation__rounds=3)  # fmt: skip
    ref = tmp_path / "ref"
    assert cli.main(["run", "--out", str(ref), *[x for o in ov for x in ("--set", o)]]) == 0
    meta = json.loads((ref / "checkpoints" / "round-000003.json").read_text())
    assert meta["machine"] == {"device": "cpu", "torch_threads": 1}  # run.threads = 1
    assert "machine_changed" not in RunDir(ref).read_summary()
    crashed = crash_after(ref, tmp_path / "crashed", 2)
    path = crashed / "checkpoints" / "round-000002.json"
    first = json.loads(path.read_text())
    path.write_text(json.dumps(first | {"machine": {"device": "cpu", "torch_threads": 7}}))
    assert RunDir(crashed).recorded_machine()["torch_threads"] == 7  # what compare checks
    with caplog.at_level(logging.WARNING, logger="fedhello"):
        assert cli.main(["run", "--resume", str(crashed)]) == 0
    assert "resuming at round 3 with {'torch_threads': 1}" in caplog.text
    summary = RunDir(crashed).read_summary()
    assert summary["machine_changed"]["what"] == ["torch_threads"]
    assert RunDir(crashed).recorded_machine()["torch_threads"] == "mixed"
