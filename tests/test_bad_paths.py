"""Bad paths are one line, exit 2, and create nothing: a file where a folder is wanted, a
folder that is not a run, a run whose files were damaged. (Each of these was a traceback, a
folder left behind, or advice to resume something that is no run.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides

from fedhello.cli import main
from fedhello.core.errors import RunDirError
from fedhello.store.runs import RunDir


def _one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fedhello: error: ")
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def _afile(tmp_path: Path) -> Path:
    path = tmp_path / "afile"
    path.write_text("not a folder")
    return path


def _finished_run(path: Path, metrics: str | None = None, summary: str | None = None) -> Path:
    """A finished run as the report reads it (summary.json, metrics.jsonl, config.toml), as
    tests/test_collapse.py fakes one: no training."""
    from fedhello.core.config import Config

    path.mkdir(parents=True)
    (path / "config.toml").write_text(Config().to_toml())
    records = [{"round": r, "test_accuracy": 0.5, "val_accuracy": 0.5,
                "clients": [{"tier": 0, "train_memory_mb": 10.0}]} for r in (1, 2)]  # fmt: skip
    default_metrics = "".join(json.dumps(r) + "\n" for r in records)
    (path / "metrics.jsonl").write_text(default_metrics if metrics is None else metrics)
    default_summary = json.dumps({"test_accuracy": 0.5, "test_macro_f1": 0.4,
                                  "client_seconds": 1.0, "bytes_up": 1e6, "bytes_down": 2e6,
                                  "num_classes": 4})  # fmt: skip
    (path / "summary.json").write_text(default_summary if summary is None else summary)
    return path


def _listing(root: Path) -> set[Path]:
    return set(root.rglob("*"))


# ---- a file where a run directory's folder would be made ------------------------------------


def test_a_run_under_a_file_is_one_line(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = _afile(tmp_path)
    args = ["run", "--out", str(afile / "sub")]
    for o in tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                            data__label_column='"topic"'):  # fmt: skip
        args += ["--set", o]
    before = _listing(tmp_path)
    assert main(args) == 2
    _one_error_line(capsys, str(afile), "is a file", "allowed: a folder")
    assert _listing(tmp_path) == before and afile.read_text() == "not a folder"


def test_holding_a_run_under_a_file_is_a_run_dir_error(tmp_path: Path) -> None:
    """What a comparison's cell does (``writing(wait=True)``) under an --out that is a file."""
    afile = _afile(tmp_path)
    for path in (afile, afile / "runs" / "iid" / "fedra" / "seed0"):
        with (
            pytest.raises(RunDirError, match="is a file; allowed: a folder"),
            RunDir(path).writing(wait=True),
        ):
            pass
        with pytest.raises(RunDirError, match="afile"):
            RunDir(path).create()
    assert _listing(tmp_path) == {afile}


# ---- report: its inputs and --out checked before anything is made --------------------------


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_report_of_no_run_is_one_line_and_creates_nothing(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("x")
    before = _listing(tmp_path)
    assert main(["report", str(target)]) == 2
    phrase = {"missing": "does not exist", "file": "is a file"}
    _one_error_line(capsys, str(target), phrase[kind])
    assert _listing(tmp_path) == before


def test_report_into_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _finished_run(tmp_path / "run")
    afile = _afile(tmp_path)
    before = _listing(tmp_path)
    for out in (afile, afile / "sub"):
        assert main(["report", str(run), "--out", str(out)]) == 2
        _one_error_line(capsys, "--out", str(afile), "is a file", "allowed: a folder")
    assert _listing(tmp_path) == before and afile.read_text() == "not a folder"


def test_report_with_a_bad_baseline_makes_no_out_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _finished_run(tmp_path / "run")
    out = tmp_path / "new" / "report"
    assert main(["report", str(run), "--baseline", "bogus", "--out", str(out)]) == 2
    _one_error_line(capsys, "'bogus'")
    assert not (tmp_path / "new").exists()


# ---- report: a damaged run ------------------------------------------------------------------


@pytest.mark.parametrize("content", ["xx", "{'a': 1}", "[1, 2]"])
def test_a_damaged_summary_is_one_line_naming_the_file(
    content: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _finished_run(tmp_path / "run", summary=content)
    before = _listing(tmp_path)
    assert main(["report", str(run)]) == 2
    line = _one_error_line(capsys, str(run / "summary.json"))
    if content != "[1, 2]":
        assert "is not valid JSON (line 1, column" in line
    assert _listing(tmp_path) == before


def test_a_bad_line_inside_metrics_is_one_line_naming_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = [json.dumps({"round": r, "test_accuracy": 0.5, "clients": []}) for r in (1, 2, 3)]
    run = _finished_run(tmp_path / "run", metrics="\n".join([good[0], "garbage", *good[1:]]))
    before = _listing(tmp_path)
    assert main(["report", str(run)]) == 2
    _one_error_line(capsys, str(run / "metrics.jsonl"), "line 2 is not valid JSON")
    assert _listing(tmp_path) == before


def test_only_a_last_line_cut_short_ends_the_metrics(tmp_path: Path) -> None:
    """A crash cuts the last line short: its round is redone on resume (kept as it was)."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    good = [json.dumps({"round": r}) for r in (1, 2)]
    run.metrics_path.write_text("\n".join([*good, '{"round": 3, "te']))
    assert [r["round"] for r in run.read_metrics()] == [1, 2]
    run.metrics_path.write_text("\n".join([good[0], '{"round": 2, "te', good[1]]) + "\n")
    with pytest.raises(RunDirError, match=r"metrics\.jsonl' line 2 is not valid JSON"):
        run.read_metrics()


# ---- export, eval and resume of something that is no run ------------------------------------


def _not_runs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp_path / "emptydir"
    empty.mkdir()
    notrun = tmp_path / "notrun"
    notrun.mkdir()
    (notrun / "notes.txt").write_text("mine")
    return {
        "missing": (tmp_path / "nosuch", "does not exist"),
        "file": (_afile(tmp_path), "is a file"),
        "empty": (empty, "is not a fedhello run (no config.toml)"),
        "notrun": (notrun, "is not a fedhello run (no config.toml)"),
    }


def test_export_and_eval_of_no_run_say_what_it_is_not_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = _not_runs(tmp_path)
    before = _listing(tmp_path)
    for path, phrase in cases.values():
        for args in (
            ["export", str(path), "--merged", str(tmp_path / "merged")],
            ["eval", str(path), "--lm-eval", "fedhello_heldout"],
        ):
            assert main(args) == 2
            line = _one_error_line(capsys, str(path), phrase)
            assert "--resume" not in line
    assert _listing(tmp_path) == before


def test_export_and_eval_of_a_finished_run_without_its_adapter_say_it_was_not_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A published run folder (docs/: summaries only) is finished: the line says its adapter
    was not kept, and gives no advice to resume it (`run --resume` would do nothing)."""
    run = _finished_run(tmp_path / "published")
    before = _listing(tmp_path)
    for args in (
        ["export", str(run), "--merged", str(tmp_path / "merged")],
        ["eval", str(run), "--lm-eval", "fedhello_heldout"],
    ):
        assert main(args) == 2
        line = _one_error_line(capsys, str(run), "finished", "adapter was not kept")
        assert "--resume" not in line and "has not finished" not in line
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_resume_of_no_folder_says_so(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, phrase = _not_runs(tmp_path)[kind]
    before = _listing(tmp_path)
    assert main(["run", "--resume", str(path)]) == 2
    _one_error_line(capsys, f"resume {str(path)!r} {phrase}", "allowed: a fedhello run folder")
    assert _listing(tmp_path) == before


# ---- run: a bad data path is the run's only line ---------------------------------------------


def test_a_run_with_a_missing_data_file_says_only_that(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Its own process (the CLI configures logging once per process): nothing is logged before
    the error line (the run's determinism note came first, at INFO)."""
    missing = tmp_path / "nope.csv"
    sets = [x for kv in tiny_overrides(tiny_bert_dir, missing) for x in ("--set", kv)]
    out = subprocess.run(
        [sys.executable, "-m", "fedhello.cli", "run", *sets, "--out", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedhello: error: data.name"), err
    assert str(missing) in err[0] and "does not exist" in err[0]
    assert not (tmp_path / "runs").exists()


# ---- compare: a config that cannot be loaded leaves no comparison behind ---------------------


def test_a_comparison_with_a_missing_data_file_is_one_line_and_makes_no_folder(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """The first cell's setup fails (no dataset): exit 2, the error its only line (the cell's
    heading used to come first), and neither --out nor the folder above it made (compare.json
    and the cell's lock file used to be left there, a half comparison)."""
    config = tmp_path / "tiny.toml"
    config.write_text(
        f'[model]\nname = "{tiny_bert_dir}"\n\n[data]\nname = "{tmp_path / "nope.csv"}"\n'
    )
    out = tmp_path / "cmp" / "c"
    before = _listing(tmp_path)
    ran = subprocess.run(
        [sys.executable, "-m", "fedhello.cli", "compare", str(config), "--strategies", "fedra",
         "--seeds", "0", "--partitions", "iid", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 2, ran.stderr
    said = ran.stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("fedhello: error: data.name"), said
    assert "nope.csv" in said[0] and "does not exist" in said[0]
    assert _listing(tmp_path) == before


def test_the_hubs_and_datasets_warnings_are_printed_once(tmp_path: Path) -> None:
    """huggingface_hub and datasets add a handler of their own to their loggers; with the
    CLI's root handler too, each of their warnings (a hub request retried, offline) came out
    twice. Its own process: the CLI's logging setup is process-wide."""
    code = (
        "import logging\n"
        "from fedhello.cli.output import setup_output\n"
        "setup_output(False)\n"
        "import datasets, huggingface_hub\n"
        "logging.getLogger('huggingface_hub.utils._http').warning('hub request retried')\n"
        "logging.getLogger('datasets.load').warning('datasets said so')\n"
        "logging.getLogger('fedhello.x').warning('fedhello said so')\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    for said in ("hub request retried", "datasets said so", "fedhello said so"):
        assert ran.stderr.count(said) == 1, ran.stderr
