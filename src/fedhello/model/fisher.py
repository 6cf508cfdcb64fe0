"""Empirical Fisher scores of the LoRA layers on the server's proxy set.

``s_l = mean over proxy examples of sum over LoRA params theta of layer l of
(d log p(y|x) / d theta)^2`` (the trace of the diagonal empirical Fisher of that layer).

Per-example gradients, batched: LoRA's A and B are plain ``nn.Linear`` modules, so for one
example the weight gradient is ``sum_t g_t x_t^T`` with ``x`` the module input and ``g`` the
gradient of the loss w.r.t. the module output at token t. Forward hooks keep ``x`` and the
output; one ``autograd.grad`` call per batch gives every ``g``; an einsum gives all per-example
gradients at once. (``torch.func.vmap(grad(...))`` fails on transformers' BERT; a loop of
single-example backward passes costs ~0.14 s per example for MiniLM-L6 on 2 cores.)
(A loop of single-example backward passes, the reference, is in tests/helpers.py.)
The authors' code used one example, the raw logit instead of log p(y|x), and summed norms.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from fedhello.data.encoding import ModelInputs
from fedhello.model.accelerator import CPU_FP32, Accelerator


def _lora_modules(
    model: torch.nn.Module, layer_of: Mapping[str, int | None]
) -> dict[str, tuple[torch.nn.Linear, int]]:
    out = {}
    for name, module in model.named_modules():
        layer = layer_of.get(f"{name}.weight")
        if isinstance(module, torch.nn.Linear) and layer is not None:
            out[name] = (module, layer)
    return out


def fisher_scores(
    model: torch.nn.Module,
    data: ModelInputs,
    indices: np.ndarray,
    layer_of: Mapping[str, int | None],
    num_layers: int,
    batch_size: int = 32,
    accelerator: Accelerator = CPU_FP32,
) -> list[float]:
    """Per-layer Fisher scores of the model's current adapter, in eval mode (no dropout). The
    forward runs on ``accelerator`` under its autocast; the per-example products are taken in fp32
    (squares of bf16 gradients summed over thousands of terms would lose the small layers)."""
    modules = _lora_modules(model, layer_of)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        module.register_forward_hook(
            lambda m, inp, out, name=name: captured.__setitem__(name, (inp[0].detach(), out))
        )
        for name, (module, _) in modules.items()
    ]
    totals = np.zeros(num_layers, dtype=np.float64)
    # fp16 gradients of small losses underflow: scale the loss, unscale in fp32 (as GradScaler)
    scale = 1024.0 if accelerator.precision == "fp16" else 1.0
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in layer_of and layer_of[name] is not None)
        model.eval()
        for start in range(0, len(indices), batch_size):
            captured.clear()
            batch = accelerator.to_device(data.batch(indices[start : start + batch_size]))
            labels = batch.pop("labels")
            with accelerator.autocast():
                logits = model(**batch).logits
            # Sum, not mean: each example's gradient of -log p(y|x) at full scale.
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            names = list(captured)
            grads = torch.autograd.grad(
                loss * scale, [captured[n][1] for n in names], allow_unused=True
            )
            for name, g in zip(names, grads, strict=True):
                if g is None:
                    continue
                x, g = captured[name][0].float(), g.float() / scale
                if x.dim() == 2:
                    x, g = x.unsqueeze(1), g.unsqueeze(1)
                per_example = torch.einsum("btd,btk->bdk", g, x)  # (batch, d_out, d_in)
                totals[modules[name][1]] += float(per_example.pow(2).sum())
    finally:
        for h in hooks:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
    return (totals / max(1, len(indices))).tolist()
