"""``fedra``: FedRA (Su et al. 2024), each client draws its layers uniformly at random per round.

It is RGD-HLA with the uniform shape; with equal weights every sampler hits the exact
inclusion probability ``n_i / L``.
"""

from __future__ import annotations

import numpy as np

from fedhello.core.allocation.base import register
from fedhello.core.allocation.randomized_geometric import WeightedRandomAllocation


@register
class FedRAAllocation(WeightedRandomAllocation):
    name = "fedra"

    def weights(self, round: int) -> np.ndarray:
        return np.full(self.num_layers, 1.0 / self.num_layers)
