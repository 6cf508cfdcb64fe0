"""Evaluation of the global model, batched, without autograd: the loss, and the task kind's
own predictions and scores (``fedhello.tasks.Task``: accuracy and macro-F1 for a classifier,
with how many classes it predicts and how evenly). Collapse is measured, never inferred:
on request, per-class recall, and a warning in the run log when the model answers (nearly)
one class (``fedhello.tasks.base.collapsed_class``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedhello.data.encoding import ModelInputs
from fedhello.model.accelerator import CPU_FP32, Accelerator
from fedhello.tasks.base import Task, classification_scores, collapsed_class, per_class_recall

logger = logging.getLogger(__name__)


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    data: ModelInputs,
    indices: np.ndarray,
    batch_size: int,
    accelerator: Accelerator = CPU_FP32,
    task: Task | None = None,
) -> tuple[np.ndarray, float]:
    """Predictions for ``indices`` (in their order; ``task.predictions``, by default the
    highest-scoring class) and the mean loss; the forward runs on ``accelerator`` (the loss is
    computed in fp32 under autocast)."""
    model.eval()
    indices = np.asarray(indices)
    order = data.length_order(indices)  # short with short: ~35% less padding on WordNet
    preds = np.empty(len(indices), dtype=np.int64)
    loss_sum = 0.0
    for start in range(0, len(order), batch_size):
        pos = order[start : start + batch_size]
        with accelerator.autocast():
            out = model(**accelerator.to_device(data.batch(indices[pos])))
        loss_sum += float(out.loss) * len(pos)
        best = task.predictions(out.logits) if task else out.logits.argmax(dim=-1)
        preds[pos] = best.cpu().numpy()
    return preds, loss_sum / max(1, len(indices))


def evaluate(
    model: torch.nn.Module,
    data: ModelInputs,
    indices: np.ndarray,
    batch_size: int,
    accelerator: Accelerator = CPU_FP32,
    task: Task | None = None,
    *,
    label_names: Sequence[str] | None = None,
    per_class: bool = False,
    collapse_check: str | None = None,
) -> dict[str, Any]:
    """The ``task``'s scores of the rows ``indices`` (``Task.scores``; without a task, a
    classifier's), then the loss and the number of examples; with ``per_class`` (and
    ``label_names``), then ``per_class_recall`` (``fedhello.tasks.base.per_class_recall``).
    ``collapse_check`` names what is evaluated: the predictions are checked for a collapse
    and the run log warns about one (``warn_if_collapsed``)."""
    preds, loss = predict(model, data, indices, batch_size, accelerator, task)
    labels = data.labels[torch.as_tensor(np.asarray(indices))].numpy()
    scores = task.scores(preds, labels) if task else classification_scores(preds, labels)
    out: dict[str, Any] = {**scores, "loss": loss, "examples": len(indices)}
    if per_class and label_names is not None:
        out["per_class_recall"] = per_class_recall(preds, labels, label_names)
    if collapse_check is not None:
        warn_if_collapsed(preds, labels, collapse_check, label_names)
    return out


def warn_if_collapsed(
    predictions: np.ndarray,
    labels: np.ndarray,
    where: str,
    label_names: Sequence[str] | None = None,
) -> bool:
    """Warn, one line, when the model answers (nearly) one class on ``where``: one class gets
    at least 80% of the predictions while the most frequent true label holds less than 50% of
    the labels (``fedhello.tasks.base.collapsed_class``). Returns whether it warned."""
    found = collapsed_class(predictions, labels)
    if found is None:
        return False
    cls, share, majority = found
    name = label_names[cls] if label_names is not None and 0 <= cls < len(label_names) else cls
    logger.warning(
        "collapse on %s: the model answers class %r for %.0f%% of %d examples (the most "
        "frequent true label holds %.0f%%)",
        where, name, 100 * share, len(predictions), 100 * majority,
    )  # fmt: skip
    return True
