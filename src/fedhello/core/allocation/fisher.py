"""``fisher`` (FIM-HLA): each client trains its n_i layers of highest Fisher score.

The server computes the scores on its proxy set (``fedhello.model.fisher``) at the refresh rounds
(``needs_scores``), and hands them over with ``observe_scores``. Until the first refresh the
allocation is drawn from the prior shape, like RGD-HLA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedhello.core.allocation.base import register
from fedhello.core.allocation.options import FisherOptions
from fedhello.core.allocation.randomized_geometric import RandomizedGeometricAllocation


class FisherScheduled(RandomizedGeometricAllocation):
    """Holds the latest Fisher scores; refreshes after ``fisher_warmup`` rounds, every
    ``fisher_every`` rounds (warm-up 2, every 5: rounds 3, 8, 13, ...). Before the first
    refresh it is RGD-HLA with the prior shape (the inherited ``weights``)."""

    uses_fisher = True
    Options = FisherOptions
    options: FisherOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scores: np.ndarray | None = None
        self.scored_round: int | None = None

    def needs_scores(self, round: int) -> bool:
        warmup, every = self.options.fisher_warmup, self.options.fisher_every
        return round > warmup and (round - warmup - 1) % every == 0

    def observe_scores(self, round: int, scores: Sequence[float]) -> None:
        if len(scores) != self.num_layers:
            raise ValueError(f"got {len(scores)} Fisher scores for {self.num_layers} layers")
        self.scores = np.asarray(scores, dtype=np.float64)
        self.scored_round = round

    def layer_scores(self) -> list[float] | None:
        return None if self.scores is None else self.scores.tolist()

    def layer_probabilities(self, round: int) -> list[float]:
        w = self.weights(round)
        return (w / w.sum()).tolist()

    def state_dict(self) -> dict[str, Any]:
        return {
            "scores": None if self.scores is None else self.scores.tolist(),
            "scored_round": self.scored_round,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scores = state.get("scores")  # a checkpoint without strategy state: none yet
        self.scores = None if scores is None else np.asarray(scores)
        self.scored_round = state.get("scored_round")


@register
class FisherAllocation(FisherScheduled):
    name = "fisher"

    def layer_probabilities(self, round: int) -> list[float]:
        """Before scores: the prior's shares; after: each layer's share of the total score."""
        if self.scores is None or self.scores.sum() <= 0:
            return super().layer_probabilities(round)
        return (self.scores / self.scores.sum()).tolist()

    def expected_coverage(self, round: int, clients: Sequence[int]) -> list[float]:
        """Before scores: the prior's expectation; after: the top-n sets themselves (the
        allocation is deterministic, so expected and realized coverage agree)."""
        if self.scores is None:
            return super().expected_coverage(round, clients)
        total = np.zeros(self.num_layers)
        for c in clients:
            total[list(self.layers_for(round, c))] += 1
        return total.tolist()

    def target(self) -> list[float]:
        """Before scores: the prior shape; after: each layer's share of every client's top-n
        set (what the strategy allocates), not the prior it no longer follows."""
        if self.scores is None:
            return super().target()
        cover = np.asarray(self.expected_coverage(0, range(len(self.budgets))))
        return (cover / cover.sum()).tolist()

    def layers_for(self, round: int, client: int) -> Sequence[int]:
        if self.scores is None:
            return super().layers_for(round, client)  # prior shape until the first refresh
        n, floor = self.window(client)
        # the n best-scored layers of the window; stable sort on -score: ties go to the
        # shallower layer, deterministically
        best = np.argsort(-self.scores[floor:], kind="stable")[:n]
        return sorted(floor + int(i) for i in best)
