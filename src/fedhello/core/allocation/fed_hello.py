"""``fed-hello``: the paper's co-design of Fisher scores and geometric priors.

Randomised allocation from the prior shape until the first Fisher refresh; from then on the
layer weights come from the Fisher scores: k-means with 3 clusters on the scores, clusters
*ordered by centroid* and mapped high/mid/low to the levels (1/9, 2/27, 1/27), mixed with the
prior ``p = lam * p_fim + (1 - lam) * p_shape``. The weights persist until the next refresh.
(The authors mapped cluster ids without sorting the centroids, so the most important layers
could get the lowest probability.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedhello.core.allocation.base import register
from fedhello.core.allocation.fisher import FisherScheduled
from fedhello.core.allocation.options import HelloOptions
from fedhello.core.seeds import Purpose, derived_int


def cluster_levels(scores: Sequence[float], levels: Sequence[float], seed: int = 0) -> np.ndarray:
    """Per-layer weight: the level of its score cluster, highest centroid -> ``levels[0]``."""
    from sklearn.cluster import KMeans

    x = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    k = min(len(levels), len(np.unique(x)))
    if k <= 1:
        return np.full(len(x), float(levels[0]))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed % (2**32)).fit(x)
    rank = np.argsort(-km.cluster_centers_.ravel())  # rank[0] = id of the highest centroid
    level_of_cluster = np.empty(k)
    level_of_cluster[rank] = np.asarray(levels[:k], dtype=np.float64)
    return level_of_cluster[km.labels_]


@register
class HelloAllocation(FisherScheduled):
    name = "fed-hello"
    Options = HelloOptions
    options: HelloOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fim_weights: np.ndarray | None = None

    def observe_scores(self, round: int, scores: Sequence[float]) -> None:
        super().observe_scores(round, scores)
        seed = derived_int(self.seed, Purpose.ALLOCATE, round, 2**31)
        levels = cluster_levels(scores, self.options.fisher_levels, seed)
        self.fim_weights = levels / levels.sum()

    def weights(self, round: int) -> np.ndarray:
        prior = super().weights(round)  # the shape
        if self.fim_weights is None:
            return prior
        lam = self.options.fisher_mix
        return lam * self.fim_weights + (1 - lam) * prior

    def state_dict(self) -> dict[str, Any]:
        fim = None if self.fim_weights is None else self.fim_weights.tolist()
        return super().state_dict() | {"fim_weights": fim}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        fim = state.get("fim_weights")
        self.fim_weights = None if fim is None else np.asarray(fim)
