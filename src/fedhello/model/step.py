"""One local step and its optimizer, as every client takes it and the cost probe measures it,
and fp16's loss scale, which outlives a client's training.

Both live here, once, so that what the probe measures (``fedhello.model.probe``) is what a
client then spends (``fedhello.model.training``): the same optimizer on the same trainable
tensors, the same autocast, loss scaling and clipping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedhello.core.config import TrainConfig
from fedhello.model.accelerator import Accelerator
from fedhello.model.hooks.base import TaskLoss
from fedhello.model.meters import SavedTensorMeter


def local_optimizer(
    params: Sequence[torch.nn.Parameter], lr: float, train: TrainConfig | None = None
) -> torch.optim.Optimizer:
    """The local optimizer over the trainable tensors, fp32 in every precision:
    ``train.optimizer`` = adamw (two moments per parameter) or sgd (one with momentum, else
    none), as ``fedhello.model.meters.train_memory_mb`` counts them
    (``TrainConfig.optimizer_moments``). Without ``train``: AdamW with its own weight decay
    0.01 (at lr 0 the weights stay whatever it is)."""
    if train is None:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=train.momentum, nesterov=train.nesterov,
            weight_decay=train.weight_decay,
        )  # fmt: skip
    beta1, beta2 = train.betas
    return torch.optim.AdamW(
        params, lr=lr, betas=(beta1, beta2), eps=train.eps, weight_decay=train.weight_decay
    )


@dataclass
class LossScale:
    """fp16's loss scale and its growth tracker, carried from one client's training to the
    next by whoever owns the process's training: the embedded engine (one per run, shared by
    its clients, which train one after another on one device) or a Flower node (in its
    ``Context.state``, between the rounds it trains). A scaler made afresh starts at 2**16 and
    halves on every overflowing step: a real model would skip its first steps in every
    round, rediscovering the scale each time. Not checkpointed: a resumed run starts afresh
    at 2**16 (its first steps may be skipped again, so an fp16 run resumed is not bit for bit
    the uninterrupted one). Ignored in any other precision (no scaling there)."""

    scale: float | None = None  # None: GradScaler's initial 2**16
    growth_tracker: int = 0  # successful steps since the scale last changed (grows at 2000)

    def scaler(self, accelerator: Accelerator) -> torch.amp.GradScaler:
        """The accelerator's scaler, resuming this scale (fp16; a disabled one otherwise)."""
        scaler = accelerator.grad_scaler()
        if scaler.is_enabled() and self.scale is not None:
            kept = {"scale": self.scale, "_growth_tracker": self.growth_tracker}
            scaler.load_state_dict(scaler.state_dict() | kept)  # growth/backoff: its own
        return scaler

    def keep(self, scaler: torch.amp.GradScaler) -> None:
        """Remember where ``scaler`` ended (one device sync, once per client)."""
        if scaler.is_enabled():
            state = scaler.state_dict()
            self.scale, self.growth_tracker = float(state["scale"]), int(state["_growth_tracker"])

    def to_record(self) -> dict[str, Any]:
        """For a Flower node's ``Context.state`` (a ConfigRecord holds scalars)."""
        if self.scale is None:
            return {}
        return {"scale": self.scale, "growth-tracker": self.growth_tracker}

    @classmethod
    def from_record(cls, record: Mapping[str, object] | None) -> LossScale:
        """The scale a node kept (``to_record``); a fresh one where it kept none."""
        scale = (record or {}).get("scale")
        tracker = (record or {}).get("growth-tracker", 0)
        if not isinstance(scale, float) or not isinstance(tracker, int):
            return cls()
        return cls(scale, tracker)


@dataclass
class LocalStep:
    """One local step: forward under autocast with the saved-for-backward meter on, backward
    (loss-scaled under fp16), gradient clipping on the true gradients, optimizer update.
    ``loss_term`` (a client hook's regulariser) joins the loss that is differentiated;
    ``task_loss`` (a client hook's loss, FedRS / FedLC) replaces the model's own loss: the
    model then runs without labels and the loss is computed from its logits.

    Under fp16 the scaler skips a step whose gradients overflowed (and halves its scale):
    ``skipped`` counts them, seen as the scale having dropped at ``update``. The scale is read
    after each update (one sync, where the step's timing waits for its queue anyway) and the
    last one kept, so no read waits for the backward pass mid-step."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    meter: SavedTensorMeter
    accelerator: Accelerator
    loss_term: Callable[[], torch.Tensor] | None = None
    task_loss: TaskLoss | None = None
    skipped: int = 0  # fp16: steps the scaler skipped (their gradients overflowed)
    _scale: float = field(default=1.0, init=False, repr=False)  # the scale after the last update

    def __post_init__(self) -> None:
        # before its first use a scaler answers its starting scale without a device sync
        self._scale = self.scaler.get_scale()

    def __call__(self, batch: Mapping[str, torch.Tensor], max_grad_norm: float) -> torch.Tensor:
        with self.meter.hooks(), self.accelerator.autocast():
            if self.task_loss is None:
                loss = self.model(**batch).loss
            else:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                loss = self.task_loss(self.model(**inputs).logits, batch["labels"])
            total = loss if self.loss_term is None else loss + self.loss_term()
        self.meter.step_done()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled():
            before, self._scale = self._scale, self.scaler.get_scale()
            self.skipped += int(self._scale < before)  # overflow halves it; growth doubles
        return loss.detach()  # the task loss minimised (a regulariser is not part of it)
