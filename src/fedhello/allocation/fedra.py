"""``fedra``: FedRA (Su et al. 2024), each client draws its layers uniformly at random per round.

With equal weights, numpy's draw without replacement hits the exact inclusion probability
``n_i / L`` for every layer, so no special sampler is needed here.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedhello.allocation.base import AllocationStrategy, register
from fedhello.seeds import Purpose, generator


@register
class FedRAAllocation(AllocationStrategy):
    name = "fedra"
    help = "uniformly random layers per client and round (FedRA)"

    def layers_for(self, round: int, client: int) -> Sequence[int]:
        rng = generator(self.seed, Purpose.ALLOCATE, round, client)
        n = min(self.budgets[client], self.num_layers)
        return rng.choice(self.num_layers, size=n, replace=False).tolist()

    def target(self) -> list[float]:
        return [1.0 / self.num_layers] * self.num_layers
