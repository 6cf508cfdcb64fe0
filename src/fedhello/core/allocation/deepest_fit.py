"""``deepest-fit``: every client trains all the layers it can afford, from the lowest block it
can afford up to the top.

The cost-optimal baseline for limits in real units: backward stops at the lowest trained
block, so the top ``n`` blocks are the cheapest placement of ``n`` layers, and a client that can
afford ``n`` layers at all can afford these. With budgets alone (no limits) it is the geometric
inverted triangle. Related work trains the layers nearest the output for the same reason
(LEGEND, arXiv 2412.20004; FedQuad, arXiv 2506.01001).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedhello.core.allocation.base import AllocationStrategy, register


@register
class DeepestFitAllocation(AllocationStrategy):
    name = "deepest-fit"

    def layers_for(self, round: int, client: int) -> Sequence[int]:
        n = min(self.budgets[client], self.num_layers)
        return range(self.num_layers - n, self.num_layers)

    def target(self) -> list[float]:
        """Every client's top ``n`` layers, summed over all clients: layer ``l`` is trained by
        the clients that can afford ``L - l`` layers or more."""
        counts = [0] * self.num_layers
        for c in range(len(self.budgets)):
            for layer in self.layers_for(0, c):
                counts[layer] += 1
        total = sum(counts)
        return [x / total for x in counts]
