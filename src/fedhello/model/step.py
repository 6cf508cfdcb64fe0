"""One local step and its optimizer, as every client takes it and the cost probe measures it.

Both live here, once, so that what the probe measures (``fedhello.model.probe``) is what a
client then spends (``fedhello.model.training``): the same optimizer on the same trainable
tensors, the same autocast, loss scaling and clipping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

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
class LocalStep:
    """One local step: forward under autocast with the saved-for-backward meter on, backward
    (loss-scaled under fp16), gradient clipping on the true gradients, optimizer update.
    ``loss_term`` (a client hook's regulariser) joins the loss that is differentiated;
    ``task_loss`` (a client hook's loss, FedRS / FedLC) replaces the model's own loss: the
    model then runs without labels and the loss is computed from its logits."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    meter: SavedTensorMeter
    accelerator: Accelerator
    loss_term: Callable[[], torch.Tensor] | None = None
    task_loss: TaskLoss | None = None

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
        return loss.detach()  # the task loss minimised (a regulariser is not part of it)
