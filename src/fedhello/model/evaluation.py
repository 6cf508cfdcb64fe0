"""Evaluation of the global model: accuracy, macro-F1 and loss, batched, without autograd."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score

from fedhello.data.encoding import ModelInputs
from fedhello.model.accelerator import CPU_FP32, Accelerator


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    data: ModelInputs,
    indices: np.ndarray,
    batch_size: int,
    accelerator: Accelerator = CPU_FP32,
) -> tuple[np.ndarray, float]:
    """Predicted classes for ``indices`` (in their order) and the mean cross-entropy loss; the
    forward runs on ``accelerator`` (the loss is computed in fp32 under autocast)."""
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
        preds[pos] = out.logits.argmax(dim=-1).cpu().numpy()
    return preds, loss_sum / max(1, len(indices))


def evaluate(
    model: torch.nn.Module,
    data: ModelInputs,
    indices: np.ndarray,
    batch_size: int,
    accelerator: Accelerator = CPU_FP32,
) -> dict[str, float]:
    """Macro-F1 averages over the classes present in the labels or the predictions."""
    preds, loss = predict(model, data, indices, batch_size, accelerator)
    labels = data.labels[torch.as_tensor(np.asarray(indices))].numpy()
    return {
        "accuracy": float((preds == labels).mean()),
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "loss": loss,
        "examples": len(indices),
    }
