"""Local training of one client: its allocated LoRA layers and the head, nothing else.

The model is shared by all clients of a run; a client only swaps the adapter state in and out,
so there is no deep copy per client.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import torch

from fedhello.aggregation import ClientUpdate
from fedhello.encoding import Encoded
from fedhello.lora import apply_layer_mask, get_state, set_state, state_nbytes
from fedhello.masks import keys_for_layers
from fedhello.seeds import Purpose, derived_int, generator


@dataclass
class ClientResult:
    update: ClientUpdate
    seconds: float
    peak_memory_mb: float  # process RSS peak while this client trained
    train_memory_mb: float  # tensors saved for backward (peak step) + grads + AdamW state
    trainable_params: int
    bytes_up: int
    bytes_down: int
    steps: int


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


def num_local_steps(num_examples: int, batch_size: int, steps: int, epochs: float | None) -> int:
    if epochs is None:
        return steps
    return max(1, math.ceil(epochs * num_examples / batch_size))


def batch_order(rng: np.random.Generator, n: int, batch_size: int, steps: int) -> list[np.ndarray]:
    """``steps`` batches walking through fresh permutations of the client's data."""
    order = np.concatenate(
        [rng.permutation(n) for _ in range(math.ceil(steps * batch_size / n) + 1)]
    )
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def train_client(
    model: torch.nn.Module,
    data: Encoded,
    indices: np.ndarray,
    client: int,
    round_: int,
    layers: Sequence[int],
    global_state: Mapping[str, np.ndarray],
    layer_of: Mapping[str, int | None],
    train_cfg: object,
    lr: float,
    seed: int,
) -> ClientResult:
    """Train ``client`` on its shard from the global state; return its upload and its costs."""
    start = time.perf_counter()
    with PeakRSS() as rss:
        set_state(model, global_state)
        params = apply_layer_mask(model, layers, layer_of)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=train_cfg.weight_decay)
        steps = num_local_steps(
            len(indices), train_cfg.batch_size, train_cfg.local_steps, train_cfg.local_epochs
        )
        rng = generator(seed, Purpose.TRAIN, round_, client)
        torch.manual_seed(derived_int(seed, Purpose.TRAIN, round_, client))  # dropout
        model.train()
        losses = []
        meter = SavedTensorMeter(model)
        for batch_pos in batch_order(rng, len(indices), train_cfg.batch_size, steps):
            batch = data.batch(indices[batch_pos])
            with meter.hooks():
                loss = model(**batch).loss
            meter.step_done()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train_cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
        upload = get_state(model, keys_for_layers(layer_of, layers))
        del optimizer
    update = ClientUpdate(
        client=client,
        layers=tuple(layers),
        num_examples=len(indices),
        tensors=upload,
        train_loss=float(np.mean(losses)),
    )
    trainable = sum(p.numel() for p in params)
    return ClientResult(
        update=update,
        seconds=time.perf_counter() - start,
        peak_memory_mb=rss.peak_mb,
        # float32 gradient + AdamW's two moments per trainable parameter
        train_memory_mb=(meter.peak + 3 * 4 * trainable) / 2**20,
        trainable_params=trainable,
        bytes_up=state_nbytes(upload),
        bytes_down=state_nbytes(global_state),
        steps=steps,
    )


def lr_at(round_: int, rounds: int, lr: float, schedule: str, min_factor: float) -> float:
    """Learning rate of round ``round_`` (1-based): constant, or decaying to ``min_factor * lr``."""
    if schedule == "constant" or rounds <= 1:
        return lr
    progress = (round_ - 1) / (rounds - 1)
    if schedule == "linear":
        factor = 1 - (1 - min_factor) * progress
    else:  # cosine
        factor = min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr * factor
