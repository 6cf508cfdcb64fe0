"""The probe: measure what one local step costs for every lowest trained block and layer count.

For each ``(b, n)`` it trains the contiguous set ``b .. b+n-1`` on a synthetic batch of
``batch_size`` inputs of the full ``max_length`` (a real batch is cut back to its longest
example, so it never needs more), exactly as a client trains (the same masks and
``LocalStep``: autocast, grad scaler, clipping, and the optimizer ``train.optimizer`` names,
built by the same ``local_optimizer``, with the local training's own hooks: FedProx's term,
FedRS / FedLC's loss). Synthetic inputs make the profile independent of any dataset: a site
can measure itself before it has read a row.

Two passes. **Memory**, one entry after another under the client's own meter
(``ClientMeter``), so it records what a client records: the training memory
(saved-for-backward peak + fp32 gradients + the optimizer's moments, and FedProx's copy of the
global weights: ``TrainConfig.state_per_param``) and, on an accelerator, the device's peak
(CUDA's allocator; MPS sampled), over ``MEMORY_STEPS`` steps (the optimizer creates its state
in the first; the second holds everything a client's later steps hold), ``FIRST_WARMUP`` more
before the first entry (kernels, allocator, caches, thread pools: once per process). This pass
is also every entry's warm-up. **Time**, in turns: ``steps`` rounds, each timing one step of
every entry (in alternating order), each step up to the device's queue having run; an entry
keeps the median of its steps and their median absolute deviation. Taking turns spreads a
burst of other work over many entries, one step each, where the median ignores it, instead of
letting it fill one entry's consecutive steps (issue 29: one entry at 5.6 s beside 0.2-0.4 s);
``fedhello.core.coherence`` then judges what is left.

Learning rate 0 and a saved adapter state leave the model as it was; the torch RNG is forked,
so the probe changes no draw of the run that follows.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from time import perf_counter  # the probe's clock (a test answers for the device through it)
from typing import Any

import numpy as np
import torch

from fedhello.core.coherence import MIN_STEPS, step_time_problem
from fedhello.core.config import TrainConfig
from fedhello.core.layers import AdapterSpec
from fedhello.core.profile import Cost, CostProfile, MemoryMeasure, probe_entries
from fedhello.model.accelerator import Accelerator
from fedhello.model.hooks import HookContext, build_hooks, train_hooks
from fedhello.model.hooks.base import HookChain
from fedhello.model.lora import apply_layer_mask, get_state, set_state
from fedhello.model.meters import ClientMeter, SavedTensorMeter
from fedhello.model.step import LocalStep, local_optimizer
from fedhello.tasks import Task

logger = logging.getLogger(__name__)

MEMORY_STEPS = 2  # per entry in the memory pass
FIRST_WARMUP = 3  # more before the probe's first entry


def synthetic_batch(
    model: torch.nn.Module, task: Task, batch_size: int, max_length: int, num_labels: int
) -> dict[str, torch.Tensor]:
    """A full-size batch of ``task``'s inputs (``Task.synthetic_batch``): ``max_length``
    tokens without padding (for multiple choice, per choice: ``num_labels`` of them per
    example), or full-size images."""
    return task.synthetic_batch(model, batch_size, max_length, num_labels)


def _hooks(
    model: torch.nn.Module,
    layers: range,
    layer_of: Mapping[str, int | None],
    params: list[torch.nn.Parameter],
    train: TrainConfig | None,
) -> HookChain:
    """The train config's hooks as a client runs them (FedProx's term, FedRS / FedLC's loss:
    what they keep for backward), every class present; the method's own are not the probe's."""
    hooks = build_hooks(() if train is None else train_hooks(train))
    num_labels = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
    hooks.setup(HookContext(model, layer_of, AdapterSpec(tuple(layers)), params, 0, 0, 0,
                            np.ones(num_labels, dtype=np.int64)))  # fmt: skip
    return hooks


def _timed(step: LocalStep, batch: dict[str, torch.Tensor], max_grad_norm: float) -> float:
    """One step, timed up to the device's queue having run (s)."""
    step.accelerator.synchronize()
    t0 = perf_counter()
    step(batch, max_grad_norm)
    step.accelerator.synchronize()
    return perf_counter() - t0


def _measure(
    model: torch.nn.Module,
    layers: range,
    layer_of: Mapping[str, int | None],
    batch: dict[str, torch.Tensor],
    accelerator: Accelerator,
    steps: int,
    max_grad_norm: float,
    train: TrainConfig | None = None,
    warmup: int = 0,
) -> Cost:
    """One entry alone, as a client trains it: ``warmup`` + ``steps`` steps under the client's
    meter; its memory, device peak and the median of the ``steps`` (consecutive: not what the
    profile keeps, ``_times_in_turns`` is)."""
    for p in model.parameters():
        p.grad = None  # the previous entry's gradients are not this one's memory
    with ClientMeter(accelerator) as meter:  # resets the device's peak, as a client's does
        params = apply_layer_mask(model, layers, layer_of)
        hooks = _hooks(model, layers, layer_of, params, train)
        optimizer = local_optimizer(params, 0.0, train)  # lr 0: the weights stay as they are
        step = LocalStep(model, params, optimizer, accelerator.grad_scaler(), meter.watch(model),
                         accelerator, hooks.loss_term(), hooks.task_loss())  # fmt: skip
        times = [_timed(step, batch, max_grad_norm) for _ in range(warmup + steps)][warmup:]
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    trainable = sum(p.numel() for p in params)
    # what a client records as its train_memory_mb (the same function, the same state)
    state = TrainConfig().state_per_param if train is None else train.state_per_param
    memory = meter.train_memory_mb(trainable, state)
    return Cost(memory, statistics.median(times), meter.device_peak_mb)


def _times_in_turns(
    model: torch.nn.Module,
    entries: Sequence[tuple[int, int]],
    layer_of: Mapping[str, int | None],
    batch: dict[str, torch.Tensor],
    accelerator: Accelerator,
    steps: int,
    max_grad_norm: float,
    train: TrainConfig | None,
) -> dict[tuple[int, int], list[float]]:
    """``steps`` timed steps of every entry, one of each per round (every other round in
    reverse, so a drift of the machine's speed does not follow the order). One optimizer over
    every trainable tensor: a step updates only the tensors with gradients, its own entry's,
    as that entry's own optimizer would, and the moments need not be made again each turn."""
    named = dict(model.named_parameters())
    optimizer = local_optimizer([named[k] for k in layer_of], 0.0, train)
    scaler, meter = accelerator.grad_scaler(), SavedTensorMeter(model)
    times: dict[tuple[int, int], list[float]] = {e: [] for e in entries}
    for turn in range(steps):
        for b, n in entries if turn % 2 == 0 else reversed(entries):
            params = apply_layer_mask(model, range(b, b + n), layer_of)
            hooks = _hooks(model, range(b, b + n), layer_of, params, train)
            step = LocalStep(model, params, optimizer, scaler, meter, accelerator,
                             hooks.loss_term(), hooks.task_loss())  # fmt: skip
            times[(b, n)].append(_timed(step, batch, max_grad_norm))
    optimizer.zero_grad(set_to_none=True)
    return times


def measure_profile(
    model: torch.nn.Module,
    layer_of: Mapping[str, int | None],
    num_layers: int,
    batch: dict[str, torch.Tensor],
    accelerator: Accelerator,
    key: dict[str, Any],
    steps: int = MIN_STEPS,
    max_grad_norm: float = 1.0,
    train: TrainConfig | None = None,
) -> CostProfile:
    """Every ``(lowest block, count)`` measured on ``model`` (already on ``accelerator``'s
    device), stepping with ``train``'s optimizer (None: AdamW, as by default), ``steps`` timed
    steps each. The profile says what its memory is checked against (the allocator's peak
    where the device answers one) and, where its times are not to be trusted, why."""
    state = get_state(model, list(layer_of))
    was_training = model.training
    on_device = accelerator.to_device(batch)
    model.train()
    entries = probe_entries(num_layers)  # all of them, or a lattice on a deep model
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            memory = {
                (b, n): _measure(model, range(b, b + n), layer_of, on_device, accelerator,
                                 MEMORY_STEPS, max_grad_norm, train, FIRST_WARMUP * (i == 0))
                for i, (b, n) in enumerate(entries)
            }  # fmt: skip
            times = _times_in_turns(model, entries, layer_of, on_device, accelerator, steps,
                                    max_grad_norm, train)  # fmt: skip
    finally:
        set_state(model, state)
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
    table = {}
    for e in entries:
        median = statistics.median(times[e])
        mad = statistics.median(abs(t - median) for t in times[e])
        table[e] = Cost(memory[e].memory_mb, median, memory[e].device_peak_mb,
                        step_mad_seconds=mad)  # fmt: skip
    head, per_layer = upload_sizes(state, layer_of, num_layers)
    peaks = all(c.device_peak_mb is not None for c in table.values())
    measure: MemoryMeasure = "allocator" if peaks else "meter"
    problem = (
        f"{steps} timed step(s) per entry, a stored profile needs at least {MIN_STEPS}"
        if steps < MIN_STEPS
        else step_time_problem(table, num_layers, steps)
    )
    return CostProfile(key, num_layers, table, per_layer, head, probe_steps=steps,
                       memory_measure=measure, warmup_steps=MEMORY_STEPS,
                       step_time_problem=problem)  # fmt: skip


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
