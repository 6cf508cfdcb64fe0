"""One local step and its optimizer, as every client takes it and the cost probe measures it.

Both live here, once, so that what the probe measures (``fedhello.model.probe``) is what a
client then spends (``fedhello.model.training``): the same optimizer on the same trainable
tensors, the same autocast, loss scaling and clipping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedhello.model.accelerator import Accelerator
from fedhello.model.meters import SavedTensorMeter


def local_optimizer(
    params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float = 0.01
) -> torch.optim.Optimizer:
    """AdamW over the trainable tensors (fp32 in every precision: two moments per parameter,
    which ``fedhello.model.meters.train_memory_mb`` counts). ``weight_decay`` defaults to
    AdamW's own 0.01: the probe, at lr 0, keeps the weights whatever it is."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@dataclass
class LocalStep:
    """One local step: forward under autocast with the saved-for-backward meter on, backward
    (loss-scaled under fp16), gradient clipping on the true gradients, optimizer update.
    ``loss_term`` (a client hook's regulariser) joins the loss that is differentiated."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    meter: SavedTensorMeter
    accelerator: Accelerator
    loss_term: Callable[[], torch.Tensor] | None = None

    def __call__(self, batch: Mapping[str, torch.Tensor], max_grad_norm: float) -> torch.Tensor:
        with self.meter.hooks(), self.accelerator.autocast():
            loss = self.model(**batch).loss
            total = loss if self.loss_term is None else loss + self.loss_term()
        self.meter.step_done()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()  # the task's loss (a regulariser is not part of the record)
