"""The probe: measure what one local step costs for every lowest trained block and layer count.

For each ``(b, n)`` it trains the contiguous set ``b .. b+n-1`` for a few steps on a synthetic
batch of ``batch_size`` inputs of the full ``max_length`` (a real batch is cut back to its
longest example, so it never needs more), exactly as a client trains (the same masks and
``LocalStep``: autocast, grad scaler, clipping, and the optimizer ``train.optimizer`` names,
built by the same ``local_optimizer``, with the local training's own hooks: FedProx's term,
FedRS / FedLC's loss), and records the same training memory a client records
(saved-for-backward peak + fp32 gradients + the optimizer's moments, and FedProx's copy of the
global weights: ``TrainConfig.state_per_param``), the median step time and, on CUDA, the
allocator's peak. Synthetic inputs make the profile independent of any dataset: a site can
measure itself before it has read a row.

Learning rate 0 and a saved adapter state leave the model as it was; the torch RNG is forked,
so the probe changes no draw of the run that follows.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedhello.core.config import TrainConfig
from fedhello.core.layers import AdapterSpec
from fedhello.core.profile import Cost, CostProfile
from fedhello.model.accelerator import Accelerator
from fedhello.model.hooks import HookContext, build_hooks, train_hooks
from fedhello.model.lora import apply_layer_mask, get_state, set_state
from fedhello.model.meters import SavedTensorMeter, train_memory_mb
from fedhello.model.step import LocalStep, local_optimizer
from fedhello.tasks import Task

logger = logging.getLogger(__name__)


def synthetic_batch(
    model: torch.nn.Module, task: Task, batch_size: int, max_length: int, num_labels: int
) -> dict[str, torch.Tensor]:
    """A full-size batch of ``task``'s inputs (``Task.synthetic_batch``): ``max_length``
    tokens without padding (for multiple choice, per choice: ``num_labels`` of them per
    example), or full-size images."""
    return task.synthetic_batch(model, batch_size, max_length, num_labels)


def _measure(
    model: torch.nn.Module,
    layers: range,
    layer_of: Mapping[str, int | None],
    batch: dict[str, torch.Tensor],
    accelerator: Accelerator,
    steps: int,
    max_grad_norm: float,
    train: TrainConfig | None = None,
) -> Cost:
    params = apply_layer_mask(model, layers, layer_of)
    # the train config's hooks as a client runs them (FedProx's term, FedRS / FedLC's loss:
    # what they keep for backward), every class present; the method's own are not the probe's
    hooks = build_hooks(() if train is None else train_hooks(train))
    num_labels = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
    hooks.setup(HookContext(model, layer_of, AdapterSpec(tuple(layers)), params, 0, 0, 0,
                            np.ones(num_labels, dtype=np.int64)))  # fmt: skip
    optimizer = local_optimizer(params, 0.0, train)  # lr 0: the weights stay as they are
    meter = SavedTensorMeter(model)
    step_once = LocalStep(model, params, optimizer, accelerator.grad_scaler(), meter, accelerator,
                          hooks.loss_term(), hooks.task_loss())  # fmt: skip
    times = []
    accelerator.reset_peak_memory()
    for step in range(steps + 1):  # one warm-up step (allocator, autocast caches, kernels)
        accelerator.synchronize()
        t0 = time.perf_counter()
        step_once(batch, max_grad_norm)
        accelerator.synchronize()
        if step > 0:
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in params)
    peak = accelerator.peak_memory_mb()
    del optimizer
    # what a client records as its train_memory_mb (the same function, the same state)
    state = TrainConfig().state_per_param if train is None else train.state_per_param
    return Cost(train_memory_mb(meter.peak, trainable, state), statistics.median(times), peak)


def measure_profile(
    model: torch.nn.Module,
    layer_of: Mapping[str, int | None],
    num_layers: int,
    batch: dict[str, torch.Tensor],
    accelerator: Accelerator,
    key: dict[str, Any],
    steps: int = 3,
    max_grad_norm: float = 1.0,
    train: TrainConfig | None = None,
) -> CostProfile:
    """Every ``(lowest block, count)`` measured on ``model`` (already on ``accelerator``'s
    device), stepping with ``train``'s optimizer (None: AdamW, as by default)."""
    state = get_state(model, list(layer_of))
    was_training = model.training
    on_device = accelerator.to_device(batch)
    model.train()
    table: dict[tuple[int, int], Cost] = {}
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            for b in range(num_layers):
                for n in range(1, num_layers - b + 1):
                    layers = range(b, b + n)
                    cost = _measure(
                        model, layers, layer_of, on_device, accelerator, steps, max_grad_norm,
                        train,
                    )  # fmt: skip
                    table[(b, n)] = cost
    finally:
        set_state(model, state)
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
    head, per_layer = upload_sizes(state, layer_of, num_layers)
    return CostProfile(key, num_layers, table, per_layer, head, probe_steps=steps)


def upload_sizes(
    state: Mapping[str, Any], layer_of: Mapping[str, int | None], num_layers: int
) -> tuple[int, list[int]]:
    """Bytes of the head and of each block's LoRA tensors in an upload (fp32 arrays)."""
    head = sum(int(v.nbytes) for k, v in state.items() if layer_of[k] is None)
    per_layer = [0] * num_layers
    for k, v in state.items():
        layer = layer_of[k]
        if layer is not None:
            per_layer[layer] += int(v.nbytes)
    return head, per_layer
