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
