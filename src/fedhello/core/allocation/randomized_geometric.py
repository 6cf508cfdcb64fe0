"""``randomized-geometric`` (RGD-HLA): every round each client draws its layers from the shape.

The default ``exact`` sampler includes layer l with probability exactly
``pi_l = min(1, c * w_l)`` (capped mass redistributed), so the expected coverage follows the
shape. ``numpy`` is the authors' ``np.random.choice(L, n, replace=False, p=w)``: successive
weighted draws flatten the shape (with the 12-layer bottleneck, a 9-layer client picks a
middle layer with probability ~0.5 instead of 9 x 1/27 = 0.33). Kept so results can be
reproduced.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence

import numpy as np

from fedhello.core.allocation.base import AllocationStrategy, register
from fedhello.core.allocation.options import RandomShapeOptions, SamplerOptions
from fedhello.core.allocation.shapes import (
    inclusion_probabilities,
    sequential_inclusion,
    shape_weights,
    systematic_sample,
)
from fedhello.core.layers import AllocationPlan
from fedhello.core.seeds import Purpose, generator

logger = logging.getLogger(__name__)


def draw_layers(
    weights: np.ndarray, budget: int, sampler: str, rng: np.random.Generator
) -> list[int]:
    """``min(budget, L)`` distinct layers drawn according to ``weights``."""
    n = min(budget, len(weights))
    if sampler == "numpy":
        p = np.asarray(weights, dtype=np.float64)
        return sorted(rng.choice(len(p), size=n, replace=False, p=p / p.sum()).tolist())
    return systematic_sample(inclusion_probabilities(weights, n), rng)


class WeightedRandomAllocation(AllocationStrategy):
    """Base for strategies that draw layers each round from per-layer weights."""

    Options = SamplerOptions
    options: SamplerOptions

    @abstractmethod
    def weights(self, round: int) -> np.ndarray:
        """Per-layer weights of ``round`` (any positive scale)."""

    def layers_for(self, round: int, client: int) -> Sequence[int]:
        """Drawn from the weights of the client's window ``[floor, L)``: the shape keeps its
        relative probabilities there (without a memory or time limit the window is every layer)."""
        rng = generator(self.seed, Purpose.ALLOCATE, round, client)
        n, floor = self.window(client)
        drawn = draw_layers(self.weights(round)[floor:], n, self.options.sampler, rng)
        return [floor + i for i in drawn]

    def expected_coverage(self, round: int, clients: Sequence[int]) -> list[float]:
        """Expected number of clients per layer under the configured sampler (each client
        drawing within its window): what the realized coverage is logged against."""
        w = self.weights(round)
        inclusion = (
            sequential_inclusion if self.options.sampler == "numpy" else inclusion_probabilities
        )
        total = np.zeros(self.num_layers)
        for c in clients:
            n, floor = self.window(c)
            total[floor:] += inclusion(w[floor:], n)
        return total.tolist()

    def allocate(self, round: int, clients: Sequence[int]) -> AllocationPlan:
        plan = super().allocate(round, clients)
        logger.debug(
            "round %d coverage %s, expected %s",
            round, plan.coverage(), np.round(self.expected_coverage(round, clients), 2).tolist(),
        )  # fmt: skip
        return plan

    def target(self) -> list[float]:
        return (self.weights(0) / self.weights(0).sum()).tolist()


@register
class RandomizedGeometricAllocation(WeightedRandomAllocation):
    name = "randomized-geometric"
    Options = RandomShapeOptions
    options: RandomShapeOptions

    def weights(self, round: int) -> np.ndarray:
        return shape_weights(self.options.shape, self.num_layers)
