"""Device and precision: resolution, the one-line errors, and what each choice does to a model.

CUDA's answers are monkeypatched where a test is about the resolution logic (this machine and CI
have no GPU); what runs on a real GPU is in test_gpu.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedhello.core.config import load_config
from fedhello.core.errors import ConfigError, RunDirError
from fedhello.model import accelerator as accel
from fedhello.model.accelerator import accelerator_for, resolve, resolve_precision
from fedhello.store.runs import RunDir


def fake_cuda(monkeypatch: pytest.MonkeyPatch, capabilities: list[tuple[int, int]]) -> None:
    """Torch's answers for a machine with one GPU per compute capability given (``cuda:i`` has
    ``capabilities[i]``). ``is_bf16_supported`` answers True, as torch does for any GPU that
    can emulate bf16 (asked of the current device): the resolution must not ask it."""

    def index(device: torch.device | int | None = None) -> int:
        return device if isinstance(device, int) else (device.index or 0) if device else 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capabilities[index(d)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: f"Fake GPU {index(d)}")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(
        name=f"Fake GPU {index(d)}", total_memory=16 * 2**30, major=capabilities[index(d)][0],
        minor=capabilities[index(d)][1]))  # fmt: skip


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
    fake_cuda(monkeypatch, [(8, 0), (8, 0)])
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\), cuda:0..cuda:1"):
        resolve("cuda:3")


@pytest.mark.parametrize(
    "capability,expected",
    [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16")],
    ids=["V100-sm70", "T4-sm75", "A100-sm80", "sm86", "H100-sm90"],
)
def test_auto_on_cuda_is_bf16_only_where_native_else_scaled_fp16(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A T4 or V100 emulates bf16 (torch's ``is_bf16_supported`` says yes): auto takes fp16
    with loss scaling there; bf16 from compute capability 8.0."""
    fake_cuda(monkeypatch, [capability])
    accelerator = resolve("auto", "auto")
    assert str(accelerator.device) == "cuda:0"
    # base stored low on a GPU
    assert (accelerator.precision, accelerator.base_precision) == (expected, expected)
    assert f"Fake GPU 0 (sm{capability[0]}{capability[1]})" in accelerator.reason
    # asked for, bf16 runs where it is emulated, with a warning that it is slow
    with caplog.at_level(logging.WARNING, logger=accel.__name__):
        assert resolve("cuda", "bf16").precision == "bf16"
    assert ("no native bf16: emulated, slow" in caplog.text) == (expected == "fp16")


def test_each_gpu_is_judged_by_its_own_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with a T4 as cuda:0 and an A100 as cuda:1 (the current device is cuda:0),
    the configured GPU decides; ``fedhello env`` reports native bf16 per GPU."""
    from fedhello.machine import devices

    fake_cuda(monkeypatch, [(7, 5), (8, 0)])
    assert resolve("cuda:1", "auto").precision == "bf16"
    assert resolve("cuda:0", "auto").precision == "fp16"
    assert resolve("cuda", "auto").precision == "fp16"  # cuda means cuda:0
    found = {d["device"]: d for d in devices()}
    assert (found["cuda:0"]["bf16"], found["cuda:1"]["bf16"]) == (False, True)
    assert found["cuda:1"]["compute_capability"] == "8.0"


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


class Moved(torch.nn.Sequential):
    """Notes the dtypes of its parameters when it is moved to a device."""

    moved_with: set[torch.dtype] | None = None

    def to(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.moved_with = {p.dtype for p in self.parameters()}
        return super().to(*args, **kwargs)


def test_place_keeps_the_adapter_fp32_and_stores_the_base_low() -> None:
    model = Moved(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    accelerator = resolve("cpu", "bf16", "bf16")
    accelerator.place(model, {"1.weight", "1.bias"})
    # cast first, then moved: the device never holds the fp32 base
    assert model.moved_with == {torch.bfloat16, torch.float32}
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
