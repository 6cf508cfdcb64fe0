"""Empirical Fisher scores of the LoRA layers on the server's proxy set.

``s_l = mean over proxy examples of sum over LoRA params theta of layer l of
(d log p(y|x) / d theta)^2`` (the trace of the diagonal empirical Fisher of that layer).
Only the factors clients train count: under FFA-LoRA (``lora.freeze_a``, the ``ffa-lora``
strategy: ``AdapterSpec.factors == "B"``) A never moves, so its gradients say nothing about
what a client of that layer can learn, and the score is B's alone.

Per-example gradients, batched: LoRA's A and B are plain ``nn.Linear`` modules, so for one
example the weight gradient is ``sum_t g_t x_t^T`` with ``x`` the module input and ``g`` the
gradient of the loss w.r.t. the module output at token t. Forward hooks keep ``x`` and the
output; one ``autograd.grad`` call per batch gives every ``g``; an einsum gives all per-example
gradients at once. (``torch.func.vmap(grad(...))`` fails on transformers' BERT; a loop of
single-example backward passes costs ~0.14 s per example for MiniLM-L6 on 2 cores.)
A multiple-choice model flattens its input to (batch x choices, tokens): the modules see one
row per (example, choice), and an example's gradient is the sum over its choices *and* tokens,
so the rows are regrouped per example, (batch x choices, T, d) -> (batch, choices x T, d),
before the square (squaring per choice would drop the cross terms between choices).
(A loop of single-example backward passes, the reference, is in tests/helpers.py.)
The authors' code used one example, the raw logit instead of log p(y|x), and summed norms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from fedhello.core.errors import UserError
from fedhello.core.layers import FACTOR_SETS, lora_factor
from fedhello.data.encoding import ModelInputs
from fedhello.model.accelerator import CPU_FP32, Accelerator


@dataclass
class FisherScale:
    """fp16's dynamic loss scale, as ``torch.amp.GradScaler`` keeps it, for a backward pass
    that can be repeated (training's scaler, ``fedhello.model.step.LossScale``, skips a step
    instead; a Fisher score cannot skip an example). fp16 spans 6e-8..65504: unscaled, the
    gradients of a small loss underflow to 0; scaled too far, they overflow to inf. Start high
    (2^16, GradScaler's initial scale), halve on a non-finite result and repeat the batch's
    backward (the graph is kept, the forward is not redone), and keep the scale that worked for
    the next batches. Below ``floor`` the overflow is not the scale's doing (a gradient above
    65504 * floor, or a NaN in the model)."""

    value: float = 2.0**16
    floor: float = 2.0**-8

    def back_off(self) -> bool:
        """Halve the scale; False once it would fall below ``floor`` (nothing left to try)."""
        if self.value / 2 < self.floor:
            return False
        self.value /= 2
        return True


def finite_backward(
    compute: Callable[[float], list[float]], scale: FisherScale | None, where: str
) -> list[float]:
    """``compute(s)`` (the batch's sums of squared, unscaled gradients, with the loss scaled by
    ``s``) until every sum is finite, backing ``scale`` off in between; ``scale`` None (fp32,
    bf16: fp32's exponent range) computes once. A non-finite result that backing off does not
    cure is one clear error, never a NaN score: a NaN sorts anywhere in ``fisher``'s ranking and
    makes KMeans raise, so a score that is not a number must stop the run, naming why."""
    while True:
        sums = compute(1.0 if scale is None else scale.value)
        if all(math.isfinite(s) for s in sums):
            return sums
        if scale is None or not scale.back_off():
            tried = "" if scale is None else f" down to loss scale {scale.value:g}"
            raise UserError(
                f"Fisher scores: {where} give non-finite gradients{tried} (the adapter has "
                "diverged, or a gradient exceeds fp16's range); allowed: a lower train.lr, or "
                "train.precision = 'bf16' or 'fp32'"
            )


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum, not mean, over the batch of each example's ``-log p(y|x)``, in fp32: each
    example's gradient at full scale. A classifier's ``y`` is its class (logits (batch,
    classes)); a causal language model's is its response (logits (batch, T, vocab), labels
    (batch, T) with -100 on the prompt and padding): the sum of the response tokens' NLL,
    position t predicting token t + 1 as in the model's own training loss."""
    if logits.dim() == 3 and labels.dim() == 2:
        return F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def _squared_sums(
    loss: torch.Tensor,
    captured: list[tuple[torch.Tensor, torch.Tensor]],
    n: int,
    s: float,
    *,
    retain: bool,
) -> list[float]:
    """Per hooked module (its input ``x`` and output): the sum over the batch's ``n`` examples
    of the squared per-example weight gradient, with the loss scaled by ``s`` and the gradient
    unscaled in fp32. ``retain`` keeps the graph for another try at a lower scale."""
    outputs = [out for _, out in captured]
    grads = torch.autograd.grad(loss * s, outputs, allow_unused=True, retain_graph=retain)
    sums = []
    for (x, _), g in zip(captured, grads, strict=True):
        if g is None:  # a module the loss does not reach: adds exactly 0
            sums.append(torch.zeros((), device=loss.device))
            continue
        x, g = x.float(), g.float() / s
        # (batch [x choices], [T,] d) -> (batch, choices x T, d): an example's rows together
        # (a classifier's T rows, or 1 row for a 2-d input, stay as they are)
        x, g = x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1])
        per_example = torch.einsum("btd,btk->bdk", g, x)  # (batch, d_out, d_in)
        sums.append(per_example.pow(2).sum())
    if not sums:
        return []
    values: list[float] = torch.stack(sums).tolist()  # one device sync per pass
    return values


def _lora_modules(
    model: torch.nn.Module, layer_of: Mapping[str, int | None], factors: str
) -> dict[str, tuple[torch.nn.Linear, int]]:
    """The LoRA linears whose weights are scored: every factor's, or B's alone."""
    out = {}
    for name, module in model.named_modules():
        key = f"{name}.weight"
        layer = layer_of.get(key)
        trained = factors == "AB" or lora_factor(key) == "B"
        if isinstance(module, torch.nn.Linear) and layer is not None and trained:
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
    factors: str = "AB",
    scale: FisherScale | None = None,
) -> list[float]:
    """Per-layer Fisher scores of the model's current adapter, in eval mode (no dropout), over
    the LoRA ``factors`` clients train (``"AB"``, or ``"B"`` under FFA-LoRA). The forward runs
    on ``accelerator`` under its autocast; the per-example products are taken in fp32 (squares
    of bf16 gradients summed over thousands of terms would lose the small layers). In fp16 the
    loss is scaled by ``scale`` (default: a fresh :class:`FisherScale`), backed off as needed."""
    if factors not in FACTOR_SETS:
        raise ValueError(f"factors = {factors!r}; allowed: {', '.join(FACTOR_SETS)}")
    modules = _lora_modules(model, layer_of, factors)
    scored = {f"{name}.weight" for name in modules}
    if scale is None and accelerator.precision == "fp16":
        scale = FisherScale()
    elif accelerator.precision != "fp16":
        scale = None  # bf16 and fp32 have fp32's exponent range: nothing to scale
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        module.register_forward_hook(
            lambda m, inp, out, name=name: captured.__setitem__(name, (inp[0].detach(), out))
        )
        for name, (module, _) in modules.items()
    ]
    totals = np.zeros(num_layers, dtype=np.float64)
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in scored)
        model.eval()
        for start in range(0, len(indices), batch_size):
            captured.clear()
            batch = accelerator.to_device(data.batch(indices[start : start + batch_size]))
            labels = batch.pop("labels")
            with accelerator.autocast():
                logits = model(**batch).logits
            loss = summed_nll(logits, labels)
            names = list(captured)
            pairs = [captured[name] for name in names]
            compute = partial(_squared_sums, loss, pairs, labels.shape[0], retain=scale is not None)
            stop = start + labels.shape[0] - 1
            where = f"proxy examples {start}..{stop} (of {len(indices)})"
            if not math.isfinite(float(loss.detach())):
                raise UserError(
                    f"Fisher scores: {where} give a non-finite loss in {accelerator.precision} "
                    "(the adapter has diverged, or the forward overflowed fp16); allowed: a "
                    "lower train.lr, or train.precision = 'bf16' or 'fp32'"
                )
            values = finite_backward(compute, scale, where)
            for name, value in zip(names, values, strict=True):
                totals[modules[name][1]] += value
            # free this batch's activations (and fp16's retained graph) before the next forward
            del compute, pairs, loss, logits
            captured.clear()
    finally:
        for h in hooks:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
    return (totals / max(1, len(indices))).tolist()
