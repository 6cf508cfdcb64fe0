"""fp16's loss scaling, the loss mean and MPS's meters: what a client does with a step that
overflows, a loss it cannot average on its device, and a device that runs asynchronously.

No GPU or Apple machine here: fp16 runs with torch's real GradScaler and fp16 autocast on the
CPU (an ``Accelerator`` built directly: the config refuses fp16 on a CPU only because a CPU has
no fast fp16 path), and where MPS is the subject, its answers are faked (its refusal of
float64, its allocator's counter, its synchronize), never the code under test.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch._C import DisableTorchFunctionSubclass

from fedhello.core.aggregation import ClientUpdate
from fedhello.model.accelerator import CPU_FP32, Accelerator
from fedhello.model.meters import ClientMeter, SavedTensorMeter
from fedhello.model.report import ClientResult, record_fields
from fedhello.model.step import LocalStep, LossScale
from fedhello.model.training import mean_loss

FP16_ON_CPU = Accelerator(torch.device("cpu"), "fp16", "fp32", "fp16 on the CPU: scaling checks")
MPS = Accelerator(torch.device("mps"), "fp32", "fp32", "faked MPS")


class Toy(torch.nn.Module):
    """The smallest model with a ``.loss``: a squared linear output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> Any:
        return SimpleNamespace(loss=self.lin(x).float().pow(2).mean())


def test_a_step_with_an_inf_loss_is_skipped_counted_and_left_out_of_the_mean() -> None:
    model = Toy()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.1)
    scaler = LossScale(scale=256.0).scaler(FP16_ON_CPU)  # small enough for its gradients
    step = LocalStep(model, params, optimizer, scaler, SavedTensorMeter(model), FP16_ON_CPU)
    good = {"x": torch.ones(2, 4)}
    losses = [step(good, 1.0)]
    assert step.skipped == 0
    before = [p.detach().clone() for p in params]
    overflow = torch.zeros(2, 4)
    overflow[:, 0] = torch.inf
    losses.append(step({"x": overflow}, 1.0))  # an inf loss, inf / NaN gradients
    assert not torch.isfinite(losses[-1])
    assert step.skipped == 1 and scaler.get_scale() == 128.0  # skipped; the scale halved
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))  # untouched
    losses.append(step(good, 1.0))
    assert step.skipped == 1
    finite = [float(loss) for loss in (losses[0], losses[2])]
    assert mean_loss(losses) == pytest.approx(np.mean(finite))
    assert np.isnan(mean_loss([losses[1]]))  # no finite step: no mean (the server rejects it)


def test_the_loss_mean_is_today_s_float64_mean_bit_for_bit() -> None:
    """With every loss finite, the CPU's numbers do not change: the float64 mean as before."""
    losses = list(torch.from_numpy(np.random.default_rng(0).normal(2, 1, 37).astype(np.float32)))
    before = float(np.mean(torch.stack(losses).double().cpu().numpy()))
    assert mean_loss(losses) == before  # exactly


class NoFloat64(torch.Tensor):
    """A tensor as MPS holds it: it refuses float64 on the device, as MPS does, and ``.cpu()``
    gives an ordinary CPU tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu:
            with DisableTorchFunctionSubclass():
                return args[0].clone()
        wants_f64 = func is torch.Tensor.to and torch.float64 in (*args[1:], *kwargs.values())
        if func is torch.Tensor.double or wants_f64:
            raise TypeError(
                "Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't "
                "support float64. Please use float32 instead."
            )
        return super().__torch_function__(func, types, args, kwargs)


def test_the_loss_mean_is_taken_on_the_cpu_for_a_device_without_float64() -> None:
    """The first client of every MPS run crashed here: the mean cast to float64 on the device."""
    losses = [torch.tensor(x).as_subclass(NoFloat64) for x in (1.0, 2.0, 4.5)]
    with pytest.raises(TypeError, match="float64"):
        torch.stack(losses).double()  # what the device refuses
    assert mean_loss(losses) == 2.5


def test_a_kept_loss_scale_resumes_and_survives_a_node_s_record() -> None:
    from flwr.app import ConfigRecord

    kept = LossScale()
    assert kept.to_record() == {} and LossScale.from_record(None) == LossScale()
    scaler = kept.scaler(FP16_ON_CPU)
    assert scaler.get_scale() == 2.0**16  # torch's start
    kept.keep(scaler)
    assert kept == LossScale(scale=2.0**16, growth_tracker=0)
    kept = LossScale(scale=1024.0, growth_tracker=7)
    resumed = kept.scaler(FP16_ON_CPU)
    assert resumed.get_scale() == 1024.0 and resumed.state_dict()["_growth_tracker"] == 7
    record = ConfigRecord(kept.to_record())  # a Flower node's Context.state holds it so
    assert LossScale.from_record(record) == kept
    assert LossScale.from_record(ConfigRecord({"scale": "x"})) == LossScale()  # unreadable
    # in any other precision there is no scaling to resume
    fp32 = Accelerator(torch.device("cpu"), "fp32", "fp32", "fp32")
    assert not kept.scaler(fp32).is_enabled()
    kept.keep(kept.scaler(fp32))
    assert kept == LossScale(scale=1024.0, growth_tracker=7)


def _result(skipped: int | None, precision: str) -> ClientResult:
    update = ClientUpdate(0, (1,), 8, {}, 0.5, None, "AB", 16)
    return ClientResult(update, 1.0, 100.0, 1.0, 10, 0, 0, 4, "cuda:0", precision,
                        skipped_steps=skipped)  # fmt: skip


def test_skipped_steps_are_recorded_and_sent_in_fp16_only() -> None:
    """A CPU's fp32 or bf16 record keeps its keys; an fp16 client's says what it skipped."""
    from fedhello.engine.flower import report_wire

    fp32 = record_fields(_result(None, "fp32"), "training")
    assert "skipped_steps" not in fp32
    fp16 = record_fields(_result(2, "fp16"), "training")
    assert fp16["skipped_steps"] == 2
    assert list(fp16)[:3] == ["num_examples", "steps", "skipped_steps"]
    for sent in (_result(None, "fp32"), _result(2, "fp16")):
        metrics, config = report_wire.encode_report(sent)
        values, problems = report_wire.decode_report(metrics, config)
        assert problems == [] and values["skipped_steps"] == sent.skipped_steps


def test_mps_steps_are_timed_to_their_end_and_its_memory_is_sampled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MPS runs asynchronously: a step is timed once its queue has run. torch keeps no MPS
    peak, so the client's device peak is the largest allocation sampled at the start, after
    each forward pass and at the end (not null, as it was)."""
    synced: list[int] = []
    allocated = iter([10, 50, 30, 20])  # MiB: start, after forward 1, after forward 2, end
    monkeypatch.setattr(torch.mps, "synchronize", lambda: synced.append(1))
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: next(allocated) * 2**20)
    model = Toy()
    with ClientMeter(MPS) as meter:
        saved = meter.watch(model)
        for _ in range(2):
            with meter.step():
                saved.step_done()  # what LocalStep calls at the end of each forward pass
    assert len(synced) == 2 and len(meter.step_times) == 2
    assert meter.device_peak_mb == 50.0


def test_cpu_seconds_leave_out_waiting_that_wall_seconds_count() -> None:
    """A client whose process waits (stopped by SIGSTOP, or starved by another training) is
    charged the wait in wall time, not in CPU time; work is charged in both. (CPU time is the
    whole process's, so another thread of it working meanwhile counts: the bounds leave room.)"""
    with ClientMeter(CPU_FP32) as idle:
        time.sleep(0.5)
    assert idle.seconds >= 0.5 and idle.cpu_seconds < 0.25
    with ClientMeter(CPU_FP32) as busy:
        end = time.process_time() + 0.5
        while time.process_time() < end:
            pass
    assert busy.cpu_seconds >= 0.5 and busy.seconds >= 0.25
