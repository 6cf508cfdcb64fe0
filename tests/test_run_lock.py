"""One process writes a run: a second one is refused in one line, or (a comparison) waits.

The lock is held by a real second process, as it would be by another ``fedhello`` on the
same machine: an OS file lock, which a process holding it in the same thread would not see.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides

from fedhello.cli import main
from fedhello.core.config import Config
from fedhello.store.runs import RunDir

# Holds the run at argv[1] for argv[2] seconds; then writes argv[3] (if any) as its summary,
# the way a process that finishes the run would, and lets go.
HOLDER = """
import sys, time
from fedhello.store.runs import RunDir
run = RunDir(sys.argv[1])
with run.writing():
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    if len(sys.argv) > 3:
        run.summary_path.write_text(sys.argv[3])
"""


def _tiny(model: Path, data: Path) -> list[str]:
    return tiny_overrides(model, data, data__text_column='"sentence"', data__label_column='"topic"')


def _hold(path: Path, seconds: float, summary: str | None = None) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", HOLDER, str(path), str(seconds)]
    proc = subprocess.Popen([*args, *([summary] if summary else [])], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize(
    "engine",
    # a deployment: the ServerApp writes the run and holds the lock, the submitting process
    # checks it first, so a held run is one line here, not a failure on the SuperLink's side
    [[], ["--engine", "flower", "--superlink", "127.0.0.1:9"]],
)
def test_a_new_run_into_a_held_folder_is_one_line_and_creates_nothing(
    engine: list[str], tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "run"
    holder = _hold(out, 60)
    try:
        args = ["run", "--out", str(out), *engine]
        for o in _tiny(tiny_bert_dir, tiny_text_csv):
            args += ["--set", o]
        assert main(args) != 0
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "being written by another fedhello process" in err and str(out) in err
    assert not out.exists()


def test_a_resume_of_a_held_run_is_refused_and_touches_nothing(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedhello.core.config import load_config

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_config(load_config(None, _tiny(tiny_bert_dir, tiny_text_csv)))  # cheap if it ran
    run.append_metrics({"round": 1, "test_accuracy": 0.5})
    before = {p.name: p.read_bytes() for p in run.path.iterdir()}
    holder = _hold(run.path, 60)
    try:
        assert main(["run", "--resume", str(run.path)]) != 0
    finally:
        holder.kill()
        holder.wait()
    assert "being written by another fedhello process" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.path.iterdir()} == before


def test_the_lock_is_released_when_its_holder_dies(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    holder = _hold(run.path, 60)
    holder.kill()  # no chance to release it: the OS does
    holder.wait()
    with run.writing():  # at once, without wait
        pass


def test_the_lock_sits_beside_the_run_and_survives_its_replacement(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "runs" / "r")
    assert run.lock_path.parent == run.path.parent and run.lock_path.name == ".r.lock"
    with run.writing():
        run.path.mkdir()
        run.write_config(Config())
        run.create(overwrite=True)  # rmtree + mkdir: the lock is not in it
        assert run.lock_path.exists()


def test_a_comparison_waits_for_the_process_running_its_cell_then_reuses_it(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Two comparisons sharing a folder: the second reaches a cell the first is running. It
    must not resume it beside the first (two writers of one metrics.jsonl); it waits, and
    finds it finished."""
    import logging

    import fedhello.studies.compare as sim
    from fedhello.studies.compare import Cell, cell_config, run_cell

    root = tmp_path / "c"
    args = ["compare", "--strategies", "fedra", "--seeds", "0", "--partitions", "iid",
            "--out", str(root)]  # fmt: skip
    for o in _tiny(tiny_bert_dir, tiny_text_csv):
        args += ["--set", o]
    assert main(args) == 0
    from fedhello.core.config import build_saved_config

    base = build_saved_config(json.loads((root / "compare.json").read_text())["base_config"])
    cell = Cell("iid", "fedra", 0)
    run = RunDir(cell.path(root))
    summary = run.summary_path.read_text()
    run.summary_path.unlink()  # the first comparison is still running it
    monkeypatch.setattr(sim, "run_embedded", lambda *a: pytest.fail("ran beside its writer"))
    holder = _hold(run.path, 1.5, summary)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fedhello"):
        outcome = run_cell(cell, cell_config(base, cell), root)
    assert holder.wait(timeout=30) == 0
    assert outcome == "reused" and time.monotonic() - t0 > 1.0
    assert any("waiting for it to finish" in r.getMessage() for r in caplog.records)


def test_a_run_reached_through_a_symlink_or_as_dot_has_one_lock_outside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "a" / "runs" / "seed0"
    real.mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "runs").symlink_to(tmp_path / "a" / "runs")  # a shared cell folder
    assert RunDir(tmp_path / "b" / "runs" / "seed0").lock_path == RunDir(real).lock_path
    monkeypatch.chdir(real)
    assert RunDir(".").lock_path == real.parent / ".seed0.lock"  # not ./..lock inside it
    holder = _hold(tmp_path / "b" / "runs" / "seed0", 60)
    try:
        from fedhello.core.errors import RunDirError

        with pytest.raises(RunDirError, match="being written by another"), RunDir(real).writing():
            pass
    finally:
        holder.kill()
        holder.wait()
