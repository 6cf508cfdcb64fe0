"""Helpers the tests share that the library does not need: equality of metrics apart from
timing, and the slow reference for Fisher scores."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedhello.core.layers import lora_factor
from fedhello.data.encoding import Encoded

# Fields of metrics.jsonl / summary.json that measure time or memory: they differ between two
# runs of the same config; everything else must not.
TIMING_FIELDS = {
    "seconds", "peak_memory_mb", "round_seconds", "wall_seconds", "eval_seconds", "fisher_seconds",
    "step_seconds",
}  # fmt: skip


def strip_timing(record: Any) -> Any:
    """A metrics record without the fields that measure time or memory (for equality checks)."""
    if isinstance(record, dict):
        return {k: strip_timing(v) for k, v in record.items() if k not in TIMING_FIELDS}
    if isinstance(record, list):
        return [strip_timing(v) for v in record]
    return record


def fisher_scores_loop(
    model: torch.nn.Module,
    data: Encoded,
    indices: np.ndarray,
    layer_of: Mapping[str, int | None],
    num_layers: int,
    factors: str = "AB",
) -> list[float]:
    """Reference: one backward pass per example, the gradients of the LoRA ``factors`` clients
    train (``"B"``: FFA-LoRA) squared. Slow; for tests and benchmarks. A multiple-choice example
    is one ``(1, choices, tokens)`` batch: its gradient sums over its choices by construction."""
    params = {
        n: p
        for n, p in model.named_parameters()
        if layer_of.get(n) is not None and (factors == "AB" or lora_factor(n) == "B")
    }
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    totals = np.zeros(num_layers, dtype=np.float64)
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in params)
        model.eval()
        for i in indices:
            batch = data.batch([i])
            labels = batch.pop("labels")
            loss = F.cross_entropy(model(**batch).logits, labels, reduction="sum")
            grads = torch.autograd.grad(loss, list(params.values()))
            for name, g in zip(params, grads, strict=True):
                totals[layer_of[name]] += float(g.pow(2).sum())  # type: ignore[index]
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
    return (totals / max(1, len(indices))).tolist()
