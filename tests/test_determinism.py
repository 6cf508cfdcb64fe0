"""``train.deterministic``: the config key, the process's deterministic mode (set by its entry
point, never by library code), and the run log's line saying what repeats bit for bit.

The settings are process-wide: every test that may change them restores them (``process``).
On this CPU-only machine a CUDA device's answers are faked where a test needs them; the CUDA
runs themselves are the ``gpu`` test at the end (skipped, with the reason, without CUDA)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

import fedhello
from fedhello.cli import main
from fedhello.core.config import load_config
from fedhello.core.config.experiment import outcome_differences
from fedhello.core.errors import ConfigError, UserError
from fedhello.model.determinism import (
    CUBLAS_ENV,
    configure_process,
    missing_settings,
    run_note,
)
from fedhello.store.rerun import without_machine
from fedhello.store.runs import RunDir

PUBLISHED = Path(__file__).parents[1] / "docs/results/runs/dirichlet/fisher/seed2"


@pytest.fixture
def process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's deterministic settings as they were, restored after the test (the
    environment variable unset during it, as in a fresh process)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    flags = [
        (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
        (torch.backends.cudnn, "deterministic"), (torch.backends.cudnn, "benchmark"),
    ]  # fmt: skip
    saved = [getattr(obj, name) for obj, name in flags]
    monkeypatch.setenv(CUBLAS_ENV, "")  # recorded, so that the end restores it (or its absence)
    monkeypatch.delenv(CUBLAS_ENV)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    for (obj, name), value in zip(flags, saved, strict=True):
        setattr(obj, name, value)


def test_the_key_defaults_to_false_and_takes_only_a_boolean() -> None:
    assert load_config().train.deterministic is False
    assert load_config(None, ["train.deterministic=true"]).train.deterministic is True
    for value in ('"auto"', "yes", "1"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"train.deterministic={value}"])
        assert str(err.value).startswith("config: train.deterministic = ")
        assert "valid boolean" in str(err.value)


def test_a_config_written_before_the_key_loads_as_it_ran(tmp_path: Path) -> None:
    """A run's config.toml without the key (every run so far) ran without deterministic mode:
    it loads with false, the setting of its time, and compares equal to today's default; a
    config written today spells the key out."""
    text = (PUBLISHED / "config.toml").read_text()
    assert "deterministic" not in text
    old = load_config(PUBLISHED / "config.toml")
    assert old.train.deterministic is False
    assert outcome_differences(old, old.model_copy(deep=True)) == []
    assert "deterministic = false" in load_config().to_toml()
    asked = load_config(PUBLISHED / "config.toml", ["train.deterministic=true"])
    differs = outcome_differences(old, asked)
    assert differs == ["train.deterministic (False -> True)"]  # on a GPU it changes the numbers


def test_configuring_the_process_sets_every_flag_and_the_cublas_workspace(
    process: None, caplog: pytest.LogCaptureFixture
) -> None:
    assert missing_settings()  # torch's defaults: TF32 convolutions, no deterministic mode
    caplog.set_level(logging.INFO, logger="fedhello")
    configure_process(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()  # an op without one raises
    assert os.environ[CUBLAS_ENV] == ":4096:8"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert missing_settings() == []
    assert "this process is deterministic" in caplog.text
    caplog.clear()
    configure_process(True)  # a Flower node calls it at every message: once is enough
    assert caplog.text == ""


def test_false_leaves_the_process_as_it_is(process: None) -> None:
    before = missing_settings()
    configure_process(False)
    assert missing_settings() == before and not torch.are_deterministic_algorithms_enabled()


def test_a_users_cublas_workspace_is_kept_if_deterministic_else_replaced(
    process: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import os

    monkeypatch.setenv(CUBLAS_ENV, ":16:8")  # the smaller deterministic workspace
    configure_process(True)
    assert os.environ[CUBLAS_ENV] == ":16:8" and missing_settings() == []
    torch.use_deterministic_algorithms(False)
    monkeypatch.setenv(CUBLAS_ENV, ":0:0")
    configure_process(True)
    assert os.environ[CUBLAS_ENV] == ":4096:8"
    assert "CUBLAS_WORKSPACE_CONFIG=':0:0' does not make cuBLAS deterministic" in caplog.text


def test_cuda_initialised_before_the_workspace_was_set_is_a_warning(
    process: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """cuBLAS reads its workspace setting once: a process that used CUDA before it was
    configured may keep a non-deterministic one, and is told so (the CUDA answer is faked)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    configure_process(True)
    assert "CUDA was initialised in this process before it was configured" in caplog.text
    assert missing_settings() == []  # the rest is set all the same


def test_the_run_log_says_what_repeats_bit_for_bit_and_why(process: None) -> None:
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")
    level, line = run_note(False, cpu)
    assert level == logging.INFO and "the same config and seed repeat bit for bit" in line
    level, line = run_note(False, cuda)
    assert level == logging.INFO and "cuda:0" in line and "to rounding, not bit for bit" in line
    assert "train.deterministic = true makes CUDA runs exact" in line
    assert run_note(False, mps)[1].startswith("not deterministic on mps")
    # asked for, but this process (a library user's, say) was never configured
    level, line = run_note(True, cuda)
    assert level == logging.WARNING and "not configured for it" in line
    assert "torch.use_deterministic_algorithms(True)" in line and "configure_process" in line
    configure_process(True)
    assert run_note(True, cuda) == (
        logging.INFO,
        "deterministic on cuda:0: deterministic algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8, "
        "no TF32, cuDNN deterministic without autotuning",
    )
    assert run_note(True, mps)[0] == logging.WARNING  # outside PyTorch's deterministic mode


def test_the_cli_configures_its_process_only_when_the_config_asks(
    process: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``fedhello run`` puts its process in deterministic mode after reading the config and
    before the run starts (the run itself is replaced by a probe of the process)."""
    seen: list[bool] = []

    def probe(*args: object, **kwargs: object) -> None:
        seen.append(torch.are_deterministic_algorithms_enabled())
        raise UserError("probed")

    monkeypatch.setattr(fedhello, "run", probe)
    assert main(["run", "--out", str(tmp_path / "a")]) == 2
    assert main(["run", "--out", str(tmp_path / "b"), "--set", "train.deterministic=true"]) == 2
    assert seen == [False, True]


def test_on_the_cpu_deterministic_mode_changes_no_number(
    process: None, tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A small Fed-HeLLo federation (training, Fisher scores, evaluation) with and without
    train.deterministic: the same metrics bit for bit, so true costs a CPU run nothing and no
    operation fedhello uses on the CPU lacks a deterministic kernel."""
    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', allocation__strategy='"fed-hello"',
                        allocation__fisher_warmup=1, train__precision='"fp32"')  # fmt: skip
    caplog.set_level(logging.INFO, logger="fedhello")
    for name, extra in (("plain", []), ("deterministic", ["train.deterministic=true"])):
        args = ["run", "--out", str(tmp_path / name)]
        for o in [*ov, *extra]:
            args += ["--set", o]
        assert main(args) == 0
    assert torch.are_deterministic_algorithms_enabled()  # the second run's process
    plain, det = RunDir(tmp_path / "plain"), RunDir(tmp_path / "deterministic")
    assert without_machine(plain.read_metrics()) == without_machine(det.read_metrics())
    assert any("layer_scores" in r for r in det.read_metrics())  # Fisher scores ran
    assert "deterministic on the CPU (its kernels are" in caplog.text
    assert "deterministic on cpu: deterministic algorithms" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_deterministic_cuda_federation_repeats_bit_for_bit(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """Two fresh processes (cuBLAS reads its workspace setting once per process), the same
    config with train.deterministic = true on CUDA: the same metrics bit for bit."""
    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', allocation__strategy='"fed-hello"',
                        allocation__fisher_warmup=1, train__device='"cuda"',
                        train__deterministic="true", train__local_steps=10)  # fmt: skip
    for name in ("a", "b"):
        args = [sys.executable, "-m", "fedhello.cli", "run", "--out", str(tmp_path / name)]
        for o in ov:
            args += ["--set", o]
        done = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "deterministic on cuda:0" in done.stderr
    a, b = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    assert without_machine(a.read_metrics()) == without_machine(b.read_metrics())
