"""``hetlora``: HetLoRA (Cho et al., EMNLP 2024), heterogeneous ranks with self-pruning and
sparsity-weighted aggregation. Implemented from the paper's definitions (the code bundled with
FlexLoRA's FederatedScope branch builds its penalty without gradients, pads to a hard-coded
width and never matches the model's keys; it is not a reference).

* Client k receives the truncation ``B[:, :r_k]``, ``A[:r_k, :]`` of the rank-``r_max`` global
  adapter and trains with the rank self-pruning regulariser
  ``lambda * sum_modules ||B[:, m:r_k]||_F * ||A[m:r_k, :]||_F``, ``m = floor(g r_k)``. If the
  tail's norm (that sum without lambda) shrank during local training, it prunes to rank ``m``
  and uploads the truncated factors; its rank only shrinks in later rounds (client state: the
  server's record of it, from accepted updates only, is checkpointed and handed to the client
  in its spec; a Flower node keeps no rank of its own).
* The server zero-pads every upload to ``r_max`` and averages the factors with the sparsity
  weights ``S_k = ||B_k A_k||_F`` (over all of the client's modules), ``Z = sum S_k``:
  ``B = sum (S_k / Z) B_k``, ``A = sum (S_k / Z) A_k``. The head, which is not a LoRA
  factor, is averaged as by every other strategy (``federation.weighting``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import Field

from fedhello.core.aggregation import (
    AggregationReport,
    ClientUpdate,
    State,
    Weighting,
    weighted_mean,
)
from fedhello.core.allocation.base import register
from fedhello.core.allocation.options import StrategyOptions
from fedhello.core.allocation.ranked import RankAllocation, RankOptions
from fedhello.core.hooks import HookSpec
from fedhello.core.layers import lora_factor
from fedhello.core.ranks import product_norm


class HetLoRAOptions(RankOptions):
    rank_penalty: float = Field(
        1e-3, ge=0, description="lambda of HetLoRA's rank self-pruning regulariser"
    )
    rank_decay: float = Field(
        0.9,
        gt=0,
        lt=1,
        description="g: a client whose tail norm shrank prunes from rank r to floor(g r)",
    )


def sparsity_weights(updates: Sequence[ClientUpdate]) -> dict[int, float]:
    """``S_k / Z`` per client, ``S_k = ||B_k A_k||_F``; equal weights if every ``S_k`` is 0."""
    norms = {u.client: product_norm(u.tensors) for u in updates}
    total = sum(norms.values())
    if total <= 0:
        return {c: 1.0 / len(norms) for c in norms}
    return {c: s / total for c, s in norms.items()}


@register
class HetLoRAAllocation(RankAllocation):
    name = "hetlora"
    Options: ClassVar[type[StrategyOptions]] = HetLoRAOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pruned: dict[int, int] = {}  # client -> the rank it pruned itself to

    @property
    def pruning(self) -> HetLoRAOptions:
        assert isinstance(self.options, HetLoRAOptions)
        return self.options

    def rank_for(self, round: int, client: int) -> int | None:
        return min(self.budget_rank(client), self.pruned.get(client, self.max_rank or 1))

    @classmethod
    def client_hooks(
        cls, options: StrategyOptions, client_model: str = "full"
    ) -> tuple[HookSpec, ...]:
        """The client's half of the method: the regulariser and the pruned upload
        (``fedhello.model.hooks.rank_pruning``)."""
        assert isinstance(options, HetLoRAOptions)
        pruning = HookSpec("rank-pruning", {
            "penalty": options.rank_penalty, "decay": options.rank_decay,
            "min_rank": options.min_rank,
        })  # fmt: skip
        return (pruning, *super().client_hooks(options, client_model))

    def aggregate(
        self,
        global_state: State,
        updates: Sequence[ClientUpdate],
        layer_of: dict[str, int | None],
        weighting: Weighting,
    ) -> tuple[State, AggregationReport, dict[str, Any]]:
        good, report, state = self.accept_with_head(global_state, updates, layer_of, weighting)
        s = sparsity_weights(good)
        lora = [k for k in global_state if lora_factor(k) is not None]
        state |= weighted_mean(global_state, good, s, lora)
        ranks = {}
        for u in good:
            rank = u.upload_rank
            current = self.rank_for(0, u.client)  # what it was handed (ranks never grow)
            if rank is not None and current is not None:
                ranks[u.client] = rank
                if rank < current:
                    self.pruned[u.client] = rank
        extra = {
            "sparsity_weights": {str(c): round(w, 6) for c, w in s.items()},
            "upload_ranks": {str(c): r for c, r in ranks.items()},
        }
        return {k: state[k] for k in global_state}, report, extra

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": {str(c): r for c, r in self.pruned.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruned = {int(c): int(r) for c, r in state.get("pruned", {}).items()}
