"""Local training of one client: its share of the adapter (``AdapterSpec``) and the head.

One loop for every method. The model is shared by all clients of a run; a client only swaps the
adapter state in and out, so there is no deep copy per client. The spec says which tensors
train and at which rank (its slice of every LoRA factor; B alone under FFA-LoRA); what a method
adds on the client (HetLoRA's rank self-pruning, FedRA's subnetwork) comes as client hooks
(``fedhello.model.hooks``), named in the task, so this module names no method.

The order of the loop is part of the results (same config and seed, same bits): load the
spec's slice, mask, hooks' setup, optimizer, the train generator and the dropout seed, then
the steps (batch order from that generator, augmentation keyed by step) inside the hooks'
context, the upload and the hooks' finish.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedhello.core.aggregation import ClientUpdate
from fedhello.core.config import Config, TrainConfig
from fedhello.core.hooks import HookSpec
from fedhello.core.layers import AdapterSpec, keys_for_spec
from fedhello.core.ranks import truncate
from fedhello.core.schedule import num_local_steps
from fedhello.core.seeds import Purpose, derived_int, generator
from fedhello.data.encoding import ModelInputs
from fedhello.model.accelerator import CPU_FP32, Accelerator
from fedhello.model.hooks import HookContext, build_hooks, hooks_for
from fedhello.model.lora import apply_spec_mask, get_state, set_state, state_nbytes
from fedhello.model.meters import ClientMeter
from fedhello.model.report import ClientResult
from fedhello.model.step import LocalStep, LossScale, local_optimizer


@dataclass(frozen=True)
class LocalTask:
    """What the server asks of one client in one round: the spec to train, the learning rate,
    and the method's client hooks. Batch order and dropout derive from (``seed``, ``round``,
    ``client``), so the same task trains the same way on any engine."""

    client: int
    round: int
    spec: AdapterSpec
    lr: float
    seed: int  # the run's seed
    hooks: tuple[HookSpec, ...] = ()  # the method's client side, in order

    @classmethod
    def of(
        cls, cfg: Config, client: int, round_: int, spec: AdapterSpec, lr: float,
        clip_norm: float | None = None,
    ) -> LocalTask:  # fmt: skip
        """The task of ``spec`` under ``cfg``'s method (the same on every engine);
        ``clip_norm``: the round's DP clip norm, applied here when ``privacy.clip_on`` is the
        client, after every other hook."""
        hooks = hooks_for(cfg)
        if clip_norm is not None and cfg.privacy.enabled and cfg.privacy.clip_on == "client":
            hooks = (*hooks, HookSpec("dp-clip", {"clip_norm": clip_norm}))
        return cls(client, round_, spec, lr, cfg.run.seed, hooks)


@dataclass(frozen=True)
class Shard:
    """A client's examples: encoded inputs and the rows of them it trains on."""

    data: ModelInputs
    rows: np.ndarray


def label_counts(shard: Shard, model: torch.nn.Module) -> np.ndarray | None:
    """How many of the shard's examples each class has (one entry per class of the model's
    head), or None where the labels are not class ids."""
    labels = shard.data.labels
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        return None
    ids = labels[torch.as_tensor(shard.rows, dtype=torch.long)].cpu().numpy()
    if ids.size and ids.min() < 0:
        return None
    num_labels = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
    return np.bincount(ids, minlength=num_labels)


def batch_order(rng: np.random.Generator, n: int, batch_size: int, steps: int) -> list[np.ndarray]:
    """``steps`` batches walking through fresh permutations of the client's data."""
    order = np.concatenate(
        [rng.permutation(n) for _ in range(math.ceil(steps * batch_size / n) + 1)]
    )
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def mean_loss(losses: Sequence[torch.Tensor]) -> float:
    """The float64 mean of the step losses that are finite (NaN if none is). One transfer at
    the end rather than a device sync per step, to the CPU before the cast: MPS has no float64.
    A non-finite loss (an fp16 overflow, a skipped step) is left out rather than making the
    whole mean, and so the update, non-finite; a non-finite *tensor* is still rejected by the
    server. With every loss finite this is the float64 mean of all of them, bit for bit."""
    values = torch.stack(list(losses)).cpu().double().numpy()
    finite = values[np.isfinite(values)]
    return float(np.mean(finite)) if finite.size else math.nan


def train_client(
    model: torch.nn.Module,
    layer_of: Mapping[str, int | None],
    shard: Shard,
    task: LocalTask,
    global_state: Mapping[str, np.ndarray],
    train_cfg: TrainConfig,
    accelerator: Accelerator = CPU_FP32,
    loss_scale: LossScale | None = None,
) -> ClientResult:
    """Train ``task.spec`` (and the head) on ``shard`` from the global state; return the
    upload and what it cost. ``model`` is already on ``accelerator``'s device
    (``Accelerator.place``); the forward runs under its autocast, the trainable tensors and
    the optimizer's state (``train_cfg.optimizer``) are fp32. ``loss_scale``: fp16's loss
    scale as the previous client of this process left it, updated here (None: a fresh one,
    kept by nobody). The trained tensors' gradients are freed at the end, so that the next
    client's device peak does not include them."""
    spec, rows = task.spec, shard.rows
    hooks = build_hooks(task.hooks)
    loss_scale = LossScale() if loss_scale is None else loss_scale
    with ClientMeter(accelerator) as meter:
        set_state(model, truncate(global_state, spec.rank))  # a no-op slice when sent sliced
        params = apply_spec_mask(model, spec, layer_of)
        ctx = HookContext(model, layer_of, spec, params, task.client, task.round, task.seed,
                          label_counts(shard, model))  # fmt: skip
        hooks.setup(ctx)  # before any step: e.g. HetLoRA's starting tail norm
        optimizer = local_optimizer(params, task.lr, train_cfg)
        scaler = loss_scale.scaler(accelerator)  # fp16 only; a no-op otherwise
        steps = num_local_steps(
            len(rows), train_cfg.batch_size, train_cfg.local_steps, train_cfg.local_epochs
        )
        rng = generator(task.seed, Purpose.TRAIN, task.round, task.client)
        torch.manual_seed(derived_int(task.seed, Purpose.TRAIN, task.round, task.client))  # dropout
        model.train()
        saved = meter.watch(model)
        step = LocalStep(model, params, optimizer, scaler, saved, accelerator, hooks.loss_term(),
                         hooks.task_loss())  # fmt: skip
        losses = []
        with hooks.local_loop(ctx):
            for i, batch_pos in enumerate(batch_order(rng, len(rows), train_cfg.batch_size, steps)):
                with meter.step():
                    # images are augmented by (seed, round, client, step): paired across methods
                    augment = (task.seed, task.round, task.client, i)
                    batch = accelerator.to_device(shard.data.batch(rows[batch_pos], augment))
                    losses.append(step(batch, train_cfg.max_grad_norm))
        upload = hooks.finish_upload(get_state(model, keys_for_spec(layer_of, spec)))
        train_loss = mean_loss(losses)
        loss_scale.keep(scaler)
        optimizer.zero_grad(set_to_none=True)  # free the gradients with the optimizer's state
        del optimizer
    trainable = sum(p.numel() for p in params)
    return ClientResult(
        update=task_update(task, len(rows), upload, train_loss, steps, train_cfg.batch_size),
        seconds=meter.seconds,
        cpu_seconds=meter.cpu_seconds,
        peak_memory_mb=meter.peak_rss_mb,
        train_memory_mb=meter.train_memory_mb(trainable, train_cfg.state_per_param),
        trainable_params=trainable,
        bytes_up=state_nbytes(upload),
        bytes_down=state_nbytes(truncate(global_state, spec.rank)),  # what the spec needs
        steps=steps,
        device=str(accelerator.device),
        precision=accelerator.precision,
        device_peak_memory_mb=meter.device_peak_mb,
        step_seconds=meter.step_seconds,
        skipped_steps=step.skipped if scaler.is_enabled() else None,
        **hooks.report(),
    )


def task_update(
    task: LocalTask,
    num_examples: int,
    upload: dict[str, np.ndarray],
    train_loss: float,
    steps: int,
    batch_size: int,
) -> ClientUpdate:
    """The upload as the server validates it: for the spec the client was handed, with the
    examples it trained on (``steps`` full batches: ``batch_order`` never cuts one short)."""
    s = task.spec
    return ClientUpdate(
        task.client, s.layers, num_examples, upload, train_loss, s.rank, s.factors,
        examples_seen=steps * batch_size, head=s.head,
    )  # fmt: skip
