"""Rank heterogeneity: every client trains every layer, at a rank its budget affords.

The base of the rank methods (``hetlora``, ``flexlora``). Budgets stay layer counts (no limits) so
that a tier means the same thing for every kind of heterogeneity: the same number of
trainable LoRA parameters. A client allowed ``n`` of ``L`` layers at rank ``r_max`` trains,
under a rank method, all ``L`` layers at rank ``round(r_max * n / L)``
(``fedhello.core.ranks.rank_for_budget``): 6 of 12 layers at rank 16 is rank 8 on all 12.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from fedhello.core.aggregation import (
    AggregationReport,
    ClientUpdate,
    State,
    Weighting,
    accept,
    example_weights,
    weighted_mean,
)
from fedhello.core.allocation.base import AllocationStrategy
from fedhello.core.allocation.options import StrategyOptions
from fedhello.core.errors import ConfigError
from fedhello.core.layers import lora_factor
from fedhello.core.ranks import rank_for_budget


class RankOptions(StrategyOptions):
    min_rank: int = Field(
        1, ge=1, description="smallest rank a client trains at (ranks range over min-rank..lora.r)"
    )


class RankAllocation(AllocationStrategy):
    """All layers, at the rank of the client's budget (the layers it may train)."""

    Options: ClassVar[type[StrategyOptions]] = RankOptions
    rank_method: ClassVar[bool] = True

    def layers_for(self, round: int, client: int) -> Sequence[int]:
        return range(self.num_layers)

    def configure_adapter(self, max_rank: int, freeze_a: bool = False) -> None:
        min_rank = self.min_rank
        if min_rank > max_rank:
            raise ConfigError(
                f"allocation.min-rank = {min_rank} is above lora.r = {max_rank}; "
                f"allowed: 1..{max_rank}"
            )
        super().configure_adapter(max_rank, freeze_a)

    @property
    def min_rank(self) -> int:
        assert isinstance(self.options, RankOptions)
        return self.options.min_rank

    def budget_rank(self, client: int) -> int:
        """The rank of ``client``'s budget (before any pruning)."""
        if self.max_rank is None:
            raise ConfigError(
                f"strategy {self.name!r} needs the adapter's rank: call configure_adapter(lora.r)"
            )
        return rank_for_budget(self.budgets[client], self.num_layers, self.max_rank, self.min_rank)

    def rank_for(self, round: int, client: int) -> int | None:
        return self.budget_rank(client)

    def target(self) -> list[float]:
        return [1.0 / self.num_layers] * self.num_layers

    def accept_with_head(
        self,
        global_state: State,
        updates: Sequence[ClientUpdate],
        layer_of: dict[str, int | None],
        weighting: Weighting,
    ) -> tuple[list[ClientUpdate], AggregationReport, State]:
        """The rank methods' common first step: the well-formed updates, the report, and the
        head (not a LoRA factor) averaged as every strategy averages it; the LoRA factors are
        the method's to combine."""
        good, report = accept(global_state, updates, layer_of, self.num_layers, weighting)
        head = [k for k in global_state if lora_factor(k) is None]
        return (
            good,
            report,
            weighted_mean(global_state, good, example_weights(good, weighting), head),
        )
