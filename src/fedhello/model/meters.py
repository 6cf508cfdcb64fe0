"""Meters of what a client's training costs: process memory and the tensors kept for backward.

``PeakRSS`` samples the resident set size of the whole process (the frozen model included);
``SavedTensorMeter`` counts only what autograd keeps for the backward pass, which is what
allocating deeper or shallower layers changes.
"""

from __future__ import annotations

import threading
from typing import Any

import psutil
import torch


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
    training costs on top of the frozen model (parameters themselves are not counted)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self.peak = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.param_storages:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def step_done(self) -> None:
        self.peak = max(self.peak, sum(self.storages.values()))
        self.storages.clear()

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
