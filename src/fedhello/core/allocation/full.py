"""``full``: every client trains all layers, ignoring budgets (the upper bound)."""

from __future__ import annotations

from collections.abc import Sequence

from fedhello.core.allocation.base import AllocationStrategy, register


@register
class FullAllocation(AllocationStrategy):
    name = "full"

    def layers_for(self, round: int, client: int) -> Sequence[int]:
        return range(self.num_layers)

    def target(self) -> list[float]:
        return [1.0 / self.num_layers] * self.num_layers
