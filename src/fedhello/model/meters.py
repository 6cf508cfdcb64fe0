"""Meters of what a client's training costs: time, process memory, the tensors kept for
backward, the accelerator's peak (CUDA's allocator keeps one; on MPS, which has none, the
largest allocation sampled after each forward pass, when the activations are held).

``PeakRSS`` samples the resident set size of the whole process (the frozen model included);
``SavedTensorMeter`` counts only what autograd keeps for the backward pass, which is what
allocating deeper or shallower layers changes. ``ClientMeter`` holds all of a client's meters
in one context, so the training loop only marks where it starts, what it watches and each
step. ``train_memory_mb`` is the training memory a client records and the probe measures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
import torch

if TYPE_CHECKING:
    from fedhello.model.accelerator import Accelerator

# Per trainable parameter, in every precision: a float32 gradient and the float32 state the
# client keeps (``TrainConfig.state_per_param``): the optimizer's moments (AdamW two, SGD with
# momentum one, plain SGD none), plus FedProx's copy of the global weights.
FP32_BYTES = 4
ADAMW_MOMENTS = 2


def train_memory_mb(saved_peak: int, trainable: int, state_per_param: int = ADAMW_MOMENTS) -> float:
    """Training memory on top of the frozen model (MiB): the peak step's tensors saved for
    backward (bytes) + the gradient and ``state_per_param`` more fp32 tensors of each of the
    ``trainable`` parameters (default: AdamW's two moments)."""
    return (saved_peak + (1 + state_per_param) * FP32_BYTES * trainable) / 2**20


class PeakRSS:
    """Samples the process RSS in a background thread; ``peak_mb`` after the ``with`` block."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


class SavedTensorMeter:
    """Bytes autograd keeps for the backward pass, per step: the activation memory that
    training costs on top of the frozen model (parameters themselves are not counted).
    ``after_forward`` is called at the end of each forward pass (``step_done``)."""

    def __init__(
        self, model: torch.nn.Module, after_forward: Callable[[], None] | None = None
    ) -> None:
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self.peak = 0
        self.after_forward = after_forward

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.param_storages:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def step_done(self) -> None:
        self.peak = max(self.peak, sum(self.storages.values()))
        self.storages.clear()
        if self.after_forward is not None:
            self.after_forward()

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


class ClientMeter:
    """Everything one client's training is measured by, in one context: wall time, the
    process's CPU time (every thread's: torch's intra-op pool and the RSS sampler included; a
    process stopped or starved by another adds wall time but no CPU time), the process
    RSS peak and the accelerator's allocator peak over the whole ``with`` block, the tensors
    saved for backward (``watch``, once the model's trainable tensors are in place: parameter
    storages are not counted, and a rank slice replaces them) and the time of each ``step``
    (up to the accelerator's queue having run).

    The device peak: CUDA's allocator peak over the block; on MPS (torch keeps no peak there)
    the largest ``torch.mps.current_allocated_memory`` sampled at the start, after each
    forward pass (activations held for backward: the step's high point short of the
    backward's transient buffers) and at the end, so a lower bound of the true peak; None on
    the CPU."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.saved: SavedTensorMeter | None = None
        self.step_times: list[float] = []
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.device_peak_mb: float | None = None
        self._sampled: float | None = None  # MPS: the largest allocation sampled so far
        self._rss = PeakRSS()

    def __enter__(self) -> ClientMeter:
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()
        self.accelerator.reset_peak_memory()
        self._sample()
        self._rss.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        peak = self.accelerator.peak_memory_mb()  # CUDA's own; None on MPS and the CPU
        self.device_peak_mb = peak if peak is not None else self._sampled
        self._rss.__exit__(*exc)
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu_start

    def _sample(self) -> None:
        """Note the MPS allocation now (host-side bookkeeping: no sync); elsewhere nothing."""
        if self.accelerator.device.type == "mps":
            now = self.accelerator.allocated_memory_mb() or 0.0
            self._sampled = max(self._sampled or 0.0, now)

    def watch(self, model: torch.nn.Module) -> SavedTensorMeter:
        """The saved-for-backward meter of ``model`` (its parameters as they are now)."""
        self.saved = SavedTensorMeter(model, self._sample)
        return self.saved

    @contextmanager
    def step(self) -> Iterator[None]:
        """One local step (batch, forward, backward, update), timed once its queue has run."""
        start = time.perf_counter()
        yield
        self.accelerator.synchronize()
        self.step_times.append(time.perf_counter() - start)

    @property
    def peak_rss_mb(self) -> float:
        return self._rss.peak_mb

    @property
    def step_seconds(self) -> float:
        """The median step, as the profile measures it (the first step also warms caches)."""
        return float(np.median(self.step_times))

    def train_memory_mb(self, trainable: int, state_per_param: int = ADAMW_MOMENTS) -> float:
        assert self.saved is not None, "watch the model first"
        return train_memory_mb(self.saved.peak, trainable, state_per_param)
