"""Local training of one client: its allocated LoRA layers and the head, nothing else.

The model is shared by all clients of a run; a client only swaps the adapter state in and out,
so there is no deep copy per client.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedhello.core.aggregation import ClientUpdate
from fedhello.core.config import TrainConfig
from fedhello.core.layers import keys_for_layers
from fedhello.core.seeds import Purpose, derived_int, generator
from fedhello.data.encoding import Encoded
from fedhello.model.accelerator import CPU_FP32, Accelerator
from fedhello.model.lora import apply_layer_mask, get_state, set_state, state_nbytes
from fedhello.model.meters import PeakRSS, SavedTensorMeter


@dataclass(frozen=True)
class LocalTask:
    """What the server asks of one client in one round. Batch order and dropout derive from
    (``seed``, ``round``, ``client``), so the same task trains the same way on any engine."""

    client: int
    round: int
    layers: tuple[int, ...]
    lr: float
    seed: int  # the run's seed


@dataclass(frozen=True)
class Shard:
    """A client's examples: encoded inputs and the rows of them it trains on."""

    data: Encoded
    rows: np.ndarray


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
    device: str = "cpu"
    precision: str = "fp32"
    device_peak_memory_mb: float | None = None  # the accelerator allocator's peak (CUDA)
    step_seconds: float = 0.0  # median time of a local step (batch, forward, backward, update)


@dataclass
class LocalStep:
    """One local step as every client takes it (and the cost probe measures it): forward
    under autocast with the saved-for-backward meter on, backward (loss-scaled under fp16),
    gradient clipping on the true gradients, AdamW update."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    meter: SavedTensorMeter
    acc: Accelerator

    def __call__(self, batch: Mapping[str, torch.Tensor], max_grad_norm: float) -> torch.Tensor:
        with self.meter.hooks(), self.acc.autocast():
            loss = self.model(**batch).loss
        self.meter.step_done()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


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
    layer_of: Mapping[str, int | None],
    shard: Shard,
    task: LocalTask,
    global_state: Mapping[str, np.ndarray],
    train_cfg: TrainConfig,
    acc: Accelerator = CPU_FP32,
) -> ClientResult:
    """Train ``task.layers`` (and the head) on ``shard`` from the global state; return the
    upload and what it cost. ``model`` is already on ``acc``'s device (``Accelerator.place``);
    the forward runs under its autocast, the trainable tensors and AdamW's state are fp32."""
    layers, indices = task.layers, shard.rows
    start = time.perf_counter()
    acc.reset_peak_memory()
    with PeakRSS() as rss:
        set_state(model, global_state)
        params = apply_layer_mask(model, layers, layer_of)
        optimizer = torch.optim.AdamW(params, lr=task.lr, weight_decay=train_cfg.weight_decay)
        scaler = acc.grad_scaler()  # fp16 only; a no-op otherwise
        steps = num_local_steps(
            len(indices), train_cfg.batch_size, train_cfg.local_steps, train_cfg.local_epochs
        )
        rng = generator(task.seed, Purpose.TRAIN, task.round, task.client)
        torch.manual_seed(derived_int(task.seed, Purpose.TRAIN, task.round, task.client))  # dropout
        model.train()
        losses = []
        meter = SavedTensorMeter(model)
        step = LocalStep(model, params, optimizer, scaler, meter, acc)
        step_times = []
        for batch_pos in batch_order(rng, len(indices), train_cfg.batch_size, steps):
            step_start = time.perf_counter()
            batch = acc.to_device(shard.data.batch(indices[batch_pos]))
            losses.append(step(batch, train_cfg.max_grad_norm))
            acc.synchronize()  # a step's time on CUDA is known once its queue has run
            step_times.append(time.perf_counter() - step_start)
        upload = get_state(model, keys_for_layers(layer_of, layers))
        del optimizer
        device_peak = acc.peak_memory_mb()
    update = ClientUpdate(
        client=task.client,
        layers=tuple(layers),
        num_examples=len(indices),
        tensors=upload,
        # one transfer at the end rather than a device sync per step; float64 mean as before
        train_loss=float(np.mean(torch.stack(losses).double().cpu().numpy())),
    )
    trainable = sum(p.numel() for p in params)
    return ClientResult(
        update=update,
        seconds=time.perf_counter() - start,
        peak_memory_mb=rss.peak_mb,
        # float32 gradient + AdamW's two moments per trainable parameter (fp32 in every precision)
        train_memory_mb=(meter.peak + 3 * 4 * trainable) / 2**20,
        trainable_params=trainable,
        bytes_up=state_nbytes(upload),
        bytes_down=state_nbytes(global_state),
        steps=steps,
        device=str(acc.device),
        precision=acc.precision,
        device_peak_memory_mb=device_peak,
        # the median, as the profile measures it (the first step also warms caches up)
        step_seconds=float(np.median(step_times)),
    )
