"""FedProx's client side (Li et al., MLSys 2020): the proximal term.

A client adds ``mu/2 * sum ||w - w_global||^2`` to its local loss, summed over every tensor it
trains (its LoRA slices and the head), ``w_global`` being those tensors as the client received
them (captured in ``setup``, after the spec's state is loaded and masked). The term is zero at
the first step and pulls the local weights back towards the global model afterwards; it is a
regulariser, so ``train_loss`` does not include it. Declared by ``train.proximal_mu > 0``
(``fedhello.model.hooks.hooks_for``), with any method.
"""

from __future__ import annotations

import torch

from fedhello.model.hooks.base import ClientHook, HookContext, LossTerm
from fedhello.model.hooks.registry import register_hook


@register_hook
class ProximalHook(ClientHook):
    """``mu/2 * sum ||w - w_global||^2`` over the client's trainable tensors. Keeps one fp32
    copy of them (``TrainConfig.state_per_param`` counts it)."""

    name = "proximal"

    def __init__(self, mu: float) -> None:
        if not mu >= 0:
            raise ValueError(f"proximal mu = {mu}: allowed: mu >= 0")
        self.mu = float(mu)
        self.params: list[torch.nn.Parameter] = []
        self.start: list[torch.Tensor] = []

    def setup(self, ctx: HookContext) -> None:
        self.params = list(ctx.params)
        self.start = [p.detach().clone() for p in self.params]

    def penalty(self) -> torch.Tensor:
        squares = [(p - w).square().sum() for p, w in zip(self.params, self.start, strict=True)]
        return 0.5 * self.mu * torch.stack(squares).sum()

    def loss_term(self) -> LossTerm | None:
        return self.penalty if self.params and self.mu > 0 else None
