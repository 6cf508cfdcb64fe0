"""``geometric`` (GD-HLA): deterministic layer sets whose collective coverage follows a shape.

Fixed across rounds. With budgets 2/4/6 of 8 layers:
triangle = the n shallowest layers, inverted-triangle = the n deepest, bottleneck = ceil(n/2)
from the bottom and floor(n/2) from the top, uniform = contiguous windows laid end to end
around the layers (client c starts where client c-1 stopped), so over all K clients every layer
is covered equally up to one.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedhello.core.allocation.base import AllocationStrategy, register
from fedhello.core.allocation.options import ShapeOptions
from fedhello.core.allocation.shapes import shape_weights


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

    def layers_for(self, round: int, client: int) -> Sequence[int]:
        """The shape drawn on the client's window ``[floor, L)`` (every layer with layer
        budgets): a triangle starts at the floor, a bottleneck splits between floor and top."""
        offset = sum(self.budgets[:client])  # uniform: windows laid end to end
        n, floor = self.window(client)
        return [
            floor + i
            for i in geometric_layers(self.options.shape, n, self.num_layers - floor, offset)
        ]

    def target(self) -> list[float]:
        return shape_weights(self.options.shape, self.num_layers).tolist()
