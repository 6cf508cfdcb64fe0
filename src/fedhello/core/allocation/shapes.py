"""Geometric shapes of the collective allocation: how many clients should train layer l.

A shape is a positive weight profile over layers 0 (shallow, input side) .. L-1 (deep),
normalised to sum to 1 (the target share of all layer-slots each layer should receive).
"""

from __future__ import annotations

import numpy as np

from fedhello.core.allocation.options import SHAPES

# The authors' bottleneck for 12 layers: three levels in ratio 3:2:1 (1/9, 2/27, 1/27).
AUTHORS_BOTTLENECK_12 = np.array(
    [1 / 9, 1 / 9, 1 / 9, 2 / 27, 2 / 27, 1 / 27, 1 / 27, 1 / 27, 2 / 27, 1 / 9, 1 / 9, 1 / 9]
)


def shape_weights(shape: str, num_layers: int) -> np.ndarray:
    """Target share per layer (sums to 1).

    triangle: ``w_l = L - l`` (a pyramid standing on layer 0); inverted-triangle: its mirror;
    bottleneck: 3:2:1 levels by distance to the nearer end (outer third of that distance high,
    middle third mid, inner third low); for 12 layers exactly the authors' vector.
    """
    L = num_layers
    if L < 1:
        raise ValueError(f"num_layers = {L}: must be >= 1")
    idx = np.arange(L, dtype=np.float64)
    if shape == "uniform":
        w = np.ones(L)
    elif shape == "triangle":
        w = L - idx
    elif shape == "inverted-triangle":
        w = idx + 1
    elif shape == "bottleneck":
        if L == 12:
            w = AUTHORS_BOTTLENECK_12.copy()
        else:
            depth = np.minimum(idx, L - 1 - idx)  # distance to the nearer end
            t = depth / depth.max() if depth.max() > 0 else np.zeros(L)
            w = np.where(t < 1 / 3, 3.0, np.where(t < 2 / 3, 2.0, 1.0))
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")
    return w / w.sum()


def inclusion_probabilities(weights: np.ndarray, n: int) -> np.ndarray:
    """Per-layer inclusion probabilities for drawing ``n`` distinct layers, as close to
    proportional to ``weights`` as possible: ``pi_l = min(1, c * w_l)`` with ``c`` chosen so
    that the probabilities sum to ``n`` (the mass a capped layer cannot take goes to the rest).
    """
    w = np.asarray(weights, dtype=np.float64)
    L = len(w)
    n = min(n, L)
    if n == L:
        return np.ones(L)
    pi = np.zeros(L)
    capped = np.zeros(L, dtype=bool)
    while True:
        free = ~capped
        scale = (n - capped.sum()) / w[free].sum()
        pi[free] = w[free] * scale
        pi[capped] = 1.0
        over = free & (pi > 1.0 + 1e-12)
        if not over.any():
            return np.minimum(pi, 1.0)
        capped |= over


def systematic_sample(pi: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Exactly ``sum(pi)`` distinct layers, layer l included with probability exactly ``pi_l``.

    Systematic sampling on a random order: points ``u, u+1, u+2, ...`` on the cumulative sum of
    the probabilities (each interval has length <= 1, so no layer is hit twice). The random
    order removes the fixed pairings plain systematic sampling would have.
    """
    order = rng.permutation(len(pi))
    cum = np.concatenate([[0.0], np.cumsum(pi[order])])
    n = round(float(cum[-1]))
    points = rng.random() + np.arange(n)
    hits = np.minimum(np.searchsorted(cum, points, side="right") - 1, len(pi) - 1)
    return sorted(int(order[h]) for h in hits)
