"""The command's face and the programs it starts: ``fedhello --help`` opens with what the tool
does, and ``flwr`` is looked up beside the running Python before PATH (a venv's fedhello runs
without the venv being activated), for ``run --engine flower`` and ``env`` alike, and started
with that directory first on its PATH. No SuperLink: a fake ``flwr`` records how it was run."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from helpers import FLWR_BOX

from fedhello.cli import main
from fedhello.core.errors import UserError
from fedhello.environment import find_program, program_env


def test_help_opens_with_what_the_tool_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]  # after the usage lines
    assert description.startswith("Federated LoRA fine-tuning of foundation models")
    for words in ("per-client layer", "embedded", "Flower", "fedhello run", "compare"):
        assert words in " ".join(description.split()), words
    assert "The ``fedhello`` command" not in out  # the developers' docstring stays in the code


def _program(folder: Path, name: str, body: str = "exit 0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def venv_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A venv's bin/ that is not on PATH, with this process running "its" Python; PATH holds
    another environment's flwr."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    other = tmp_path / "other-env" / "bin"
    _program(other, "flwr")
    monkeypatch.setenv("PATH", os.pathsep.join([str(other), "/usr/bin", "/bin"]))
    return bin_dir


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-ins")
def test_programs_are_found_beside_the_interpreter_before_path(
    venv_bin: Path, tmp_path: Path
) -> None:
    on_path = str(tmp_path / "other-env" / "bin" / "flwr")
    assert find_program("flwr") == on_path  # nothing beside the interpreter: PATH's
    beside = _program(venv_bin, "flwr")
    assert find_program("flwr") == str(beside)  # the environment fedhello runs in wins
    assert find_program("no-such-program-here") is None


def test_a_started_program_gets_the_interpreters_directory_first_on_its_path(
    venv_bin: Path,
) -> None:
    before = dict(os.environ)
    env = program_env()
    parts = env["PATH"].split(os.pathsep)
    assert parts[0] == str(venv_bin) and parts.count(str(venv_bin)) == 1
    assert parts[1:] == os.environ["PATH"].split(os.pathsep)
    assert dict(os.environ) == before  # a new dict: this process's environment untouched
    again = program_env(env)  # already first: not repeated
    assert again["PATH"] == env["PATH"]
    assert program_env({"X": "1"})["PATH"] == str(venv_bin) and "X" in program_env({"X": "1"})


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-ins")
def test_run_on_a_superlink_uses_the_environments_flwr_and_env_reports_it(
    venv_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The flwr beside the interpreter is the one run, and what it would start
    (flower-superlink, flwr-serverapp, ...) is found from its PATH; ``fedhello env`` names the
    same flwr."""
    from fedhello.core.config import load_config
    from fedhello.engine.flower.runner import run_flower_deployment
    from fedhello.store.runs import RunDir

    record = tmp_path / "flwr-ran.txt"
    _program(venv_bin, "flower-superlink")
    flwr = _program(
        venv_bin, "flwr",
        f'echo "$0" > "{record}"; command -v flower-superlink >> "{record}"\n'
        'echo "Error: no SuperLink here (test stand-in)" >&2; exit 3',
    )  # fmt: skip
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    with pytest.raises(UserError, match=r"flwr run failed \(exit 3.*no SuperLink here"):
        run_flower_deployment(load_config(), RunDir(tmp_path / "run"), "127.0.0.1:9")
    ran, superlink = record.read_text().split()
    assert ran == str(flwr) and superlink == str(venv_bin / "flower-superlink")

    assert main(["env", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["flwr"] == str(flwr)
    assert main(["env"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("flwr"))
    assert str(flwr) in line


def test_a_missing_flwr_is_one_line_naming_where_it_was_looked_for(
    venv_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedhello.core.config import load_config
    from fedhello.engine.flower.runner import run_flower_deployment
    from fedhello.store.runs import RunDir

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"neither beside this Python \(.*venv/bin/python\) nor"):
        run_flower_deployment(load_config(), RunDir(tmp_path / "run"), "127.0.0.1:9")
    assert not (tmp_path / "run").exists()


def test_flwrs_error_box_is_read_whole_as_one_line() -> None:
    from fedhello.engine.flower.runner import flwr_failure

    assert flwr_failure("Loading project...\n" + FLWR_BOX) == (
        "Connection to the SuperLink is unavailable. Please check your network connection "
        "and 'address' in the SuperLink connection configuration."
    )
    tb = "Traceback (most recent call last):\n  File x\nValueError: bad thing\n"
    assert flwr_failure(tb) == "ValueError: bad thing"  # no box: the exception's line


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-ins")
def test_a_deployment_that_writes_no_new_summary_fails_and_leaves_no_config_behind(
    venv_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flwr run --stream`` exits 0 even when the ServerApp failed: a summary left by an
    earlier run (``--overwrite``) must not be returned as this launch's."""
    import json

    from fedhello.core.config import load_config
    from fedhello.engine.flower.runner import run_flower_deployment
    from fedhello.store.runs import RunDir

    _program(venv_bin, "flwr", 'echo "streaming logs"; exit 0')
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_summary({"test_accuracy": 0.5, "old": True})
    (run.path / "config.toml").write_text("")
    with pytest.raises(UserError, match=r"flwr run failed \(exit 0.*streaming logs"):
        run_flower_deployment(load_config(), run, "127.0.0.1:9", options=_overwrite())
    assert json.loads(run.summary_path.read_text())["old"] is True  # untouched
    assert not (tmp_path / ".run.config.toml").exists()  # the ServerApp's copy: gone


def _overwrite() -> object:
    from fedhello.engine.core import RunOptions

    return RunOptions(overwrite=True)


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-ins")
def test_a_deployment_that_outlives_its_timeout_is_stopped_in_one_line(
    venv_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedhello.core.config import load_config
    from fedhello.engine.flower.runner import deployment_timeout, run_flower_deployment
    from fedhello.store.runs import RunDir

    pidfile = tmp_path / "flwr.pid"
    _program(venv_bin, "flwr", f'echo $$ > "{pidfile}"; sleep 30')
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    with pytest.raises(UserError, match=r"did not finish within 1 s .*flwr ls"):
        run_flower_deployment(load_config(), RunDir(tmp_path / "run"), "127.0.0.1:9", timeout=1)
    with pytest.raises(ProcessLookupError):  # stopped, not left running or waited for
        os.kill(int(pidfile.read_text()), 0)
    cfg = load_config()  # by default: bounded by the config's own timeouts, never forever
    f = cfg.federation
    assert deployment_timeout(cfg) == f.node_wait + (f.rounds + 2) * (f.round_timeout + 3600)


def test_a_superlink_entry_is_never_reused_for_another_tls_setting(tmp_path: Path) -> None:
    from fedhello.engine.flower.runner import flwr_home_entry

    plain = flwr_home_entry(tmp_path, None, "10.0.0.1:9093", None)
    tls = flwr_home_entry(tmp_path, None, "10.0.0.1:9093", "/etc/ca.pem")
    other_ca = flwr_home_entry(tmp_path, None, "10.0.0.1:9093", "/etc/ca2.pem")
    assert len({plain, tls, other_ca}) == 3
    assert flwr_home_entry(tmp_path, None, "10.0.0.1:9093", None) == plain  # reused as is
    text = (tmp_path / "config.toml").read_text()
    assert text.count("[superlink.") == 3 and text.count("insecure = true") == 1


@pytest.mark.parametrize(
    "args,words",
    [
        (["--superlink", "127.0.0.1:9093"], "--superlink with --engine embedded"),
        (["--engine", "flower-sim", "--root-certificates", "ca.pem"],
         "--root-certificates with --engine flower-sim"),
        (["--engine", "flower", "--superlink", "not-an-address"],
         "--superlink 'not-an-address': allowed: HOST:PORT"),
    ],
)  # fmt: skip
def test_deployment_flags_are_checked_before_anything_runs(
    args: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "r").exists()


def _env_lines(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, str]:
    assert main(["env", *args]) == 0  # env reports; it refuses nothing
    return {x[:10].strip(): x[11:] for x in capsys.readouterr().out.splitlines()}


def test_env_names_the_columns_a_local_file_lacks_from_its_first_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that exists is not yet data a run can read: a csv without the configured label
    column was "available". The header and first rows are read only: the malformed row
    after them, which a whole read stops at, goes unread (a large file costs no more)."""
    import pandas as pd

    rows = "text,topic\n" + "a few words,animals\n" * 6 + "a,row,of,four\n"
    data = tmp_path / "texts.csv"
    data.write_text(rows)
    with pytest.raises(pd.errors.ParserError):  # what a whole read meets
        pd.read_csv(data)
    line = _env_lines(capsys, "--set", f'data.name="{data}"')["data"]
    assert line == (
        f"NOT available: data.label_column = 'label': dataset {str(data)!r} has no such label "
        "column; its columns: text, topic"
    )
    # the text column missing too: both in the one line, the input column first
    line = _env_lines(capsys, "--set", f'data.name="{data}"', "--set", 'data.text_column="body"')[
        "data"
    ]
    assert line.startswith("NOT available: data.text_column = 'body': dataset ")
    assert "; data.label_column = 'label': dataset " in line
    # configured as the file has them: available, as before
    line = _env_lines(capsys, "--set", f'data.name="{data}"', "--set",
                      'data.label_column="topic"')["data"]  # fmt: skip
    assert line == str(data.resolve())
    tsv = tmp_path / "texts.tsv"
    tsv.write_text("text\tlabel\nsome words\tx\n")
    assert _env_lines(capsys, "--set", f'data.name="{tsv}"')["data"] == str(tsv.resolve())


def test_env_reads_the_columns_of_parquet_jsonl_and_saved_datasets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import datasets
    import pandas as pd

    frame = pd.DataFrame({"text": ["a b", "c d"], "topic": ["x", "y"]})
    parquet, jsonl, saved = tmp_path / "d.parquet", tmp_path / "d.jsonl", tmp_path / "saved"
    frame.to_parquet(parquet)
    frame.to_json(jsonl, orient="records", lines=True)
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame)}).save_to_disk(str(saved))
    for path in (parquet, jsonl, saved):
        line = _env_lines(capsys, "--set", f'data.name="{path}"')["data"]
        assert line.startswith("NOT available: data.label_column = 'label'"), (path, line)
        assert "its columns: text, topic" in line
        ok = _env_lines(
            capsys, "--set", f'data.name="{path}"', "--set", 'data.label_column="topic"'
        )
        assert ok["data"] == str(path.resolve())
