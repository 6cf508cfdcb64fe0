"""``exclusive``: only clients whose budget covers every layer train; the others sit out.

The paper's baseline for "ignore weak clients": no heterogeneity to handle, at the price of
the weak clients' data.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedhello.core.allocation.base import AllocationStrategy, register


@register
class ExclusiveAllocation(AllocationStrategy):
    name = "exclusive"

    def layers_for(self, round: int, client: int) -> Sequence[int]:
        return range(self.num_layers) if self.budgets[client] >= self.num_layers else ()

    def target(self) -> list[float]:
        return [1.0 / self.num_layers] * self.num_layers
