"""Budget baselines of the paper's comparisons: ``exclusive`` and ``straggler``.

(``full`` and ``fedra`` have their own modules.)
"""

from __future__ import annotations

from collections.abc import Sequence

from fedhello.allocation.base import AllocationStrategy, register


@register
class ExclusiveAllocation(AllocationStrategy):
    name = "exclusive"
    help = "only clients whose budget covers every layer train (all layers); the others sit out"

    def layers_for(self, round: int, client: int) -> Sequence[int]:
        return range(self.num_layers) if self.budgets[client] >= self.num_layers else ()

    def target(self) -> list[float]:
        return [1.0 / self.num_layers] * self.num_layers


@register
class StragglerAllocation(AllocationStrategy):
    name = "straggler"
    help = "every client trains the smallest budget's worth of layers, the same (deepest) set"

    def layers_for(self, round: int, client: int) -> Sequence[int]:
        n = min(min(self.budgets), self.num_layers)
        return range(self.num_layers - n, self.num_layers)

    def target(self) -> list[float] | None:
        n = min(min(self.budgets), self.num_layers)
        return [0.0 if i < self.num_layers - n else 1.0 / n for i in range(self.num_layers)]
