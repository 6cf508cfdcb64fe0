"""``geometric`` (GD-HLA): deterministic layer sets whose collective coverage follows a shape.

Fixed across rounds. With budgets 2/4/6 of 8 layers:
triangle = the n shallowest layers, inverted-triangle = the n deepest, uniform = contiguous
windows laid end to end around the layers (client c starts where client c-1 stopped), so over
all K clients every layer is covered equally up to one.

bottleneck = half of each client's layers from each end, then balanced against the shape's
target over all clients (``balance_coverage``). Half from each end alone hits the authors'
12-layer vector exactly at 6/9/12, but not smaller models: at 6 layers with budgets 3/5/6 the
odd layer of every odd budget went to the bottom half, giving shares [.214, .214, .143, .071,
.143, .214] against the (capped) target [.214, .190, .095, .095, .190, .214].
"""

from __future__ import annotations

from collections.abc import Sequence

from fedhello.core.allocation.base import AllocationStrategy, register
from fedhello.core.allocation.options import ShapeOptions
from fedhello.core.allocation.shapes import balance_coverage, capped_targets, shape_weights


def geometric_layers(shape: str, budget: int, num_layers: int, offset: int = 0) -> list[int]:
    n = min(budget, num_layers)
    if shape == "triangle":
        return list(range(n))
    if shape == "inverted-triangle":
        return list(range(num_layers - n, num_layers))
    if shape == "bottleneck":
        low = (n + 1) // 2
        return sorted({*range(low), *range(num_layers - (n - low), num_layers)})
    if shape == "uniform":
        return sorted((offset + i) % num_layers for i in range(n))
    raise ValueError(f"unknown shape {shape!r}")


@register
class GeometricAllocation(AllocationStrategy):
    name = "geometric"
    Options = ShapeOptions
    options: ShapeOptions
    _sets: list[list[int]]
    _sets_key: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # budgets, floors

    def layers_for(self, round: int, client: int) -> Sequence[int]:
        """The shape drawn on the client's window ``[floor, L)`` (every layer with layer
        budgets): a triangle starts at the floor, a bottleneck splits between floor and top."""
        if self.options.shape == "bottleneck":
            return self.bottleneck_sets()[client]
        return self._drawn(client)

    def _drawn(self, client: int) -> list[int]:
        offset = sum(self.budgets[:client])  # uniform: windows laid end to end
        n, floor = self.window(client)
        return [
            floor + i
            for i in geometric_layers(self.options.shape, n, self.num_layers - floor, offset)
        ]

    def bottleneck_sets(self) -> list[list[int]]:
        """Every client's bottleneck set, balanced over all clients; recomputed when a budget
        changes (a Flower node declaring its own)."""
        key = (tuple(self.budgets), tuple(self.floors))
        if self._sets_key != key:
            targets = capped_targets(
                shape_weights("bottleneck", self.num_layers),
                [self.window(c)[0] for c in range(len(self.budgets))],
                self.floors,
            )
            start = [self._drawn(c) for c in range(len(self.budgets))]
            self._sets = balance_coverage(start, targets, self.floors)
            self._sets_key = key
        return self._sets

    def target(self) -> list[float]:
        return shape_weights(self.options.shape, self.num_layers).tolist()
