"""HetLoRA's client side: rank self-pruning (Cho et al., EMNLP 2024; the server's half is
``fedhello.core.allocation.hetlora``).

A client handed rank ``r`` trains with ``penalty * sum ||B[:, m:r]||_F ||A[m:r, :]||_F`` over
its trained modules added to the loss, ``m = max(min_rank, floor(decay * r))``. If that tail's
norm shrank during local training, it uploads its factors truncated to rank ``m``; the server
then hands it rank ``m`` from the next round on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fedhello.core.aggregation import State
from fedhello.core.ranks import lora_pairs, truncate
from fedhello.model.hooks.base import ClientHook, HookContext, LossTerm
from fedhello.model.hooks.registry import register_hook


@dataclass(frozen=True)
class RankPruning:
    """The regulariser's weight ``penalty``, the ``decay`` g and the rank never pruned below."""

    penalty: float
    decay: float
    min_rank: int

    def keep(self, rank: int) -> int:
        return max(self.min_rank, math.floor(self.decay * rank))


class TailNorm:
    """The tail of a rank-``r`` client: components ``m..r`` of every trained module,
    ``m = pruning.keep(r)``. ``penalty`` is the regulariser (differentiable), ``pruned_rank``
    the rank to upload: ``m`` if the tail's norm shrank since construction, else ``r``. Built
    after the masks and before the first step: its starting norm is the one to beat."""

    def __init__(self, model: torch.nn.Module, pruning: RankPruning, rank: int) -> None:
        self.pruning, self.rank = pruning, rank
        self.keep = pruning.keep(rank)
        params = dict(model.named_parameters())
        trained = [(params[a], params[b]) for a, b in lora_pairs(params).values()
                   if params[b].requires_grad]  # fmt: skip
        self.pairs = trained if self.keep < self.rank else []
        self.start = self.norm()

    def _terms(self) -> Iterator[torch.Tensor]:
        for a, b in self.pairs:
            yield torch.linalg.norm(b[:, self.keep :]) * torch.linalg.norm(a[self.keep :, :])

    def penalty(self) -> torch.Tensor:
        return self.pruning.penalty * torch.stack(list(self._terms())).sum()

    @torch.no_grad()
    def norm(self) -> float:
        return float(sum(float(t) for t in self._terms())) if self.pairs else 0.0

    def pruned_rank(self) -> int:
        return self.keep if self.pairs and self.norm() < self.start else self.rank


@register_hook
class RankPruningHook(ClientHook):
    """The regulariser on the tail while training, the pruned rank on the upload. A client
    whose tail is empty (``m = r``, e.g. rank 1) trains and uploads as without the hook."""

    name = "rank-pruning"

    def __init__(self, penalty: float, decay: float, min_rank: int) -> None:
        self.pruning = RankPruning(penalty, decay, min_rank)
        self.tails: TailNorm | None = None

    def setup(self, ctx: HookContext) -> None:
        if ctx.spec.rank is None:
            raise ValueError("rank self-pruning needs a rank: the spec has the full rank (None)")
        self.tails = TailNorm(ctx.model, self.pruning, ctx.spec.rank)

    def loss_term(self) -> LossTerm | None:
        assert self.tails is not None, "setup first"
        return self.tails.penalty if self.tails.pairs else None

    def finish_upload(self, upload: State) -> State:
        assert self.tails is not None, "setup first"
        return truncate(upload, self.tails.pruned_rank())
