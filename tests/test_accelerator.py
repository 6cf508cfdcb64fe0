"""Device and precision: resolution, the one-line errors, and what each choice does to a model.

CUDA's answers are monkeypatched where a test is about the resolution logic (this machine and CI
have no GPU); what runs on a real GPU is in test_gpu.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedhello.core.config import load_config
from fedhello.core.errors import ConfigError, RunDirError
from fedhello.model import accelerator as accel
from fedhello.model.accelerator import accelerator_for, resolve, resolve_precision
from fedhello.store.runs import RunDir


def fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int, bf16: bool) -> None:
    monkeypatch.setattr(accel, "cuda_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")


@pytest.mark.parametrize(
    "device,precision,message",
    [
        ("cuda", "auto", "train.device = 'cuda': this machine has no CUDA device"),
        ("cuda:1", "auto", "train.device = 'cuda:1': this machine has no CUDA device"),
        ("cpu", "fp16", "train.precision = 'fp16' on the CPU"),
    ],
)
def test_impossible_choices_are_one_line_errors(device: str, precision: str, message: str) -> None:
    if accel.cuda_count():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(ConfigError) as err:
        resolve(device, precision)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text and "allowed" in text


def test_unchecked_values_from_a_node_config_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"precision = 'fp8': allowed: auto, fp32, bf16, fp16"):
        resolve("cpu", "fp8")
    with pytest.raises(ConfigError, match=r"device = 'gpu0': allowed: auto, cpu, cuda"):
        resolve("gpu0")


def test_a_gpu_index_past_the_last_names_the_ones_there(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, count=2, bf16=True)
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\), cuda:0..cuda:1"):
        resolve("cuda:3")


@pytest.mark.parametrize("bf16,expected", [(True, ("bf16", "bf16")), (False, ("fp16", "fp16"))])
def test_auto_on_cuda_is_bf16_where_supported_else_scaled_fp16(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: tuple[str, str]
) -> None:
    fake_cuda(monkeypatch, count=1, bf16=bf16)
    accelerator = resolve("auto", "auto")
    assert str(accelerator.device) == "cuda:0"
    assert (
        accelerator.precision,
        accelerator.base_precision,
    ) == expected  # base stored low on a GPU
    assert "Fake GPU" in accelerator.reason
    if not bf16:
        with pytest.raises(ConfigError, match="does not support bf16"):
            resolve("cuda", "bf16")


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_is_bf16_only_with_native_instructions(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: str
) -> None:
    monkeypatch.setattr(accel, "cpu_has_bf16", lambda: native)
    precision, reason = resolve_precision("auto", torch.device("cpu"))
    assert precision == expected and reason.startswith("auto:")
    accelerator = resolve("cpu", "auto")
    assert (
        accelerator.base_precision == "fp32"
    )  # a CPU keeps the base in fp32 (docs/PERFORMANCE.md)


def test_config_refuses_unknown_values_before_any_resolution() -> None:
    with pytest.raises(ConfigError, match=r"train.device = 'gpu': allowed: auto, cpu, cuda"):
        load_config(None, ["train.device=gpu"])
    with pytest.raises(ConfigError, match=r"train.precision = 'fp8'"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="allowed: auto, fp32 or the compute precision"):
        load_config(None, ["train.precision=bf16", "train.base_precision=fp16"])


def test_place_keeps_the_adapter_fp32_and_stores_the_base_low() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    accelerator = resolve("cpu", "bf16", "bf16")
    accelerator.place(model, {"1.weight", "1.bias"})
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes == {"0.weight": torch.bfloat16, "0.bias": torch.bfloat16,
                      "1.weight": torch.float32, "1.bias": torch.float32}  # fmt: skip
    with accelerator.autocast():
        out = model(torch.ones(3, 4))
    assert out.dtype == torch.bfloat16
    assert not accelerator.grad_scaler().is_enabled()  # bf16 needs no loss scaling


def test_a_resumed_run_keeps_the_precision_it_ran_in(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.device=cpu"])
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    assert run.recorded_precision() is None
    run.append_metrics({"round": 1, "clients": [{"client": 0}]})  # written before precision
    fp32 = {"precision": "fp32", "base_precision": "fp32"}
    assert run.recorded_precision() == fp32
    assert accelerator_for(cfg, fp32).precision == "fp32"  # auto keeps what the run ran in
    bf16 = load_config(None, ["train.device=cpu", "train.precision=bf16"])
    with pytest.raises(ConfigError, match="has run in 'fp32' so far"):
        accelerator_for(bf16, fp32)


@pytest.mark.skipif(accel.cuda_count() > 0, reason="this machine has a CUDA device")
def test_cli_refuses_a_missing_gpu_before_loading_anything(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedhello.cli", "run", "--set", "train.device=cuda:1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.device = 'cuda:1'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_env_reports_devices_resolution_and_offline_availability(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from fedhello.cli import main

    assert main(["env", "--json", "--set", "train.precision=fp32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"].startswith("2.13.0")  # the pin
    assert report["devices"][-1]["device"] == "cpu"
    assert report["resolved"]["precision"] == "fp32"
    assert report["offline"]["model"]["available"]  # the shipped MiniLM snapshot
    assert report["offline"]["data"]["available"]  # the built-in WordNet file
    # a config that cannot run here is described, not refused: env is what bug reports quote
    args = ["env", "--set", "train.device=cuda:7", "--set", "model.name=no-such-model"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cannot run here: train.device = 'cuda:7'" in out
    assert "model      NOT available: model.name = 'no-such-model'" in out


def test_a_legacy_run_reads_as_fp32_and_compare_will_not_mix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cell run before ``train.precision`` existed (no key in its config, none in its
    records) ran in fp32: reused where the cell resolves to fp32, refused where ``auto`` now
    means bf16 (a CPU with bf16 instructions), so a comparison never mixes the two."""
    import json

    from fedhello.core.config import load_saved_config
    from fedhello.studies.compare import Cell, run_cell

    monkeypatch.setattr(accel, "cpu_has_bf16", lambda: True)
    cell = Cell("iid", "fedra", 0)
    cfg = load_config(None, ["train.device=cpu", "data.partition=iid"])
    run = RunDir(cell.path(tmp_path))
    run.path.mkdir(parents=True)
    lines = cfg.to_toml().splitlines(keepends=True)
    legacy = "".join(x for x in lines if "precision = " not in x)  # precision, base-precision
    assert "precision" not in legacy
    run.config_path.write_text(legacy)
    run.summary_path.write_text(json.dumps({"test_accuracy": 0.5}))
    assert load_saved_config(run.config_path).train.precision == "fp32"
    with pytest.raises(RunDirError, match=r"precision \('fp32' -> 'bf16'"):
        run_cell(cell, cfg, tmp_path)
    fp32 = load_config(None, ["train.device=cpu", "data.partition=iid", "train.precision=fp32"])
    assert run_cell(cell, fp32, tmp_path) == "reused"
