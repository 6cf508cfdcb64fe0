"""``straggler``: every client trains the smallest budget's worth of layers, the same set.

The paper's baseline for "everyone waits for the weakest": all clients train, but no client
uses more than the weakest can afford. The set is the deepest layers, the cheapest placement
(backward stops at the lowest trained block).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedhello.core.allocation.base import AllocationStrategy, register


@register
class StragglerAllocation(AllocationStrategy):
    name = "straggler"

    def _depth(self) -> int:
        return min(min(self.budgets), self.num_layers)

    def layers_for(self, round: int, client: int) -> Sequence[int]:
        return range(self.num_layers - self._depth(), self.num_layers)

    def target(self) -> list[float]:
        n = self._depth()
        return [0.0 if i < self.num_layers - n else 1.0 / n for i in range(self.num_layers)]
