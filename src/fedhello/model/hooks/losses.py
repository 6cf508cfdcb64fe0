"""Skew-aware local losses: they replace the task's cross-entropy during local training only
(evaluation keeps plain cross-entropy), from the client's own label counts.

- ``restricted-softmax`` (FedRS, Li and Zhan, KDD 2021): the logits of the classes absent from
  the client's shard are multiplied by ``alpha`` in [0, 1] before the softmax cross-entropy, so
  the client pushes them down less (alpha 1: plain cross-entropy; 0: absent classes' logits
  are 0).
- ``logit-adjusted`` (FedLC, Zhang et al., ICML 2022): a margin ``tau * n_c^(-1/4)`` is
  subtracted from class c's logit before the softmax cross-entropy, ``n_c`` the shard's count
  of class c. An absent class counts as ``n_c = 1e-8`` (margin ``100 tau``), the rule of the
  public FedLC implementations (FL-bench, ``src/client/fedlc.py``: ``max(1e-8, count)``): its
  logit leaves the local softmax almost entirely, so the client barely pushes it down.

Both compute the loss in fp32 from the logits (the mean over the batch, as the model's own
loss), and are what the client minimises and records as ``train_loss``. Declared by
``train.loss`` (``fedhello.model.hooks.hooks_for``); classification tasks only (a
multiple-choice label is an answer position, not a class: the task refuses them).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedhello.model.hooks.base import ClientHook, HookContext, TaskLoss
from fedhello.model.hooks.registry import register_hook

# FedLC's count for a class absent from the shard (n^(-1/4) = 100): FL-bench's max(1e-8, count)
ABSENT_COUNT = 1e-8


def restricted_softmax_loss(
    logits: torch.Tensor, labels: torch.Tensor, present: torch.Tensor, alpha: float
) -> torch.Tensor:
    """FedRS: mean cross-entropy of ``logits`` (batch, classes) with the columns of absent
    classes (``present`` False) multiplied by ``alpha``."""
    scale = torch.full(present.shape, float(alpha), dtype=torch.float32, device=logits.device)
    scale[present.to(logits.device)] = 1.0
    return F.cross_entropy(logits.float() * scale, labels)


def calibration_margins(counts: np.ndarray, tau: float) -> np.ndarray:
    """FedLC's margin of every class, ``tau * max(n_c, 1e-8)^(-1/4)`` (float64)."""
    return tau * np.maximum(np.asarray(counts, dtype=np.float64), ABSENT_COUNT) ** -0.25


def logit_adjusted_loss(
    logits: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor
) -> torch.Tensor:
    """FedLC: mean cross-entropy of ``logits`` (batch, classes) minus each class's margin."""
    return F.cross_entropy(logits.float() - margins.to(logits.device), labels)


def _counts(ctx: HookContext, who: str) -> np.ndarray:
    if ctx.label_counts is None:
        raise ValueError(f"{who} needs the client's class counts: its labels are not class ids")
    return np.asarray(ctx.label_counts)


def _check_classes(logits: torch.Tensor, num_classes: int, who: str) -> None:
    if logits.dim() != 2 or logits.shape[-1] != num_classes:
        raise ValueError(
            f"{who}: logits of shape {tuple(logits.shape)}, expected (batch, {num_classes}) "
            "(one per class of the shard's label counts)"
        )


@register_hook
class RestrictedSoftmaxHook(ClientHook):
    """FedRS's restricted softmax, with the client's present classes taken in ``setup``."""

    name = "restricted-softmax"

    def __init__(self, alpha: float) -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"restricted-softmax alpha = {alpha}: allowed: 0 <= alpha <= 1")
        self.alpha = float(alpha)
        self.present: torch.Tensor | None = None

    def setup(self, ctx: HookContext) -> None:
        self.present = torch.from_numpy(_counts(ctx, self.name) > 0)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        assert self.present is not None, "setup first"
        _check_classes(logits, len(self.present), self.name)
        return restricted_softmax_loss(logits, labels, self.present.to(logits.device), self.alpha)

    def task_loss(self) -> TaskLoss | None:
        return self.loss


@register_hook
class LogitAdjustedHook(ClientHook):
    """FedLC's calibrated loss, with the client's margins computed in ``setup``."""

    name = "logit-adjusted"

    def __init__(self, tau: float) -> None:
        if not tau > 0:
            raise ValueError(f"logit-adjusted tau = {tau}: allowed: tau > 0")
        self.tau = float(tau)
        self.margins: torch.Tensor | None = None

    def setup(self, ctx: HookContext) -> None:
        margins = calibration_margins(_counts(ctx, self.name), self.tau)
        self.margins = torch.from_numpy(margins).float()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        assert self.margins is not None, "setup first"
        _check_classes(logits, len(self.margins), self.name)
        return logit_adjusted_loss(logits, labels, self.margins)

    def task_loss(self) -> TaskLoss | None:
        return self.loss
