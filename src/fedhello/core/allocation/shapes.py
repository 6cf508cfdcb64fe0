"""Geometric shapes of the collective allocation: how many clients should train layer l.

A shape is a positive weight profile over layers 0 (shallow, input side) .. L-1 (deep),
normalised to sum to 1 (the target share of all layer-slots each layer should receive).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

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


def capped_targets(
    weights: np.ndarray, budgets: Sequence[int], floors: Sequence[int] | None = None
) -> np.ndarray:
    """How many clients should train each layer: the shape's share of all the clients'
    layer-slots, ``c * w_l``, held between what the clients force and what they allow, with
    ``c`` chosen so the targets still add up to the slots. At most the clients whose window
    ``[floor, L)`` holds the layer (no client trains a layer twice: with the 6-layer
    bottleneck and budgets 3/5/6, 12 clients, 56 slots, the end layers' share would be 14);
    at least the clients that train their whole window (40 full-budget clients train every
    layer, whatever the shape asks of the middle)."""
    w = np.asarray(weights, dtype=np.float64)
    L = len(w)
    floors = floors if floors is not None else [0] * len(budgets)
    hi = np.zeros(L)
    lo = np.zeros(L)
    for n, f in zip(budgets, floors, strict=True):
        hi[f:] += 1
        if n >= L - f:
            lo[f:] += 1
    slots = sum(min(int(n), L - f) for n, f in zip(budgets, floors, strict=True))
    low, high = 0.0, float(slots / w.min()) + 1.0  # sum(clip(c * w)) grows with c
    for _ in range(100):
        c = (low + high) / 2
        if np.clip(c * w, lo, hi).sum() < slots:
            low = c
        else:
            high = c
    return np.clip(high * w, lo, hi)


def balance_coverage(
    sets: Sequence[Sequence[int]], targets: np.ndarray, floors: Sequence[int]
) -> list[list[int]]:
    """Move layers between the clients' sets until every layer's coverage is within one slot
    of ``targets``, as far as single exchanges get it: while a layer is off by more than one,
    a client holding a layer ``a`` more than one slot further above its target than a layer
    ``b`` it lacks (in its window ``[floor, L)``) trains ``b`` instead of ``a``; the largest
    such gap goes first. Budgets never change, and sets whose coverage is already within one
    slot (the 12-layer bottleneck at 6/9/12 hits the authors' vector exactly) are kept.
    Where no exchange helps but the target is still unmet (e.g. clients training every layer
    force every layer's coverage up) it stops at the closest coverage it reached."""
    L = len(targets)
    chosen = [set(s) for s in sets]
    excess = -np.asarray(targets, dtype=np.float64)
    for s in chosen:
        excess[list(s)] += 1
    while True:
        best: tuple[float, int, int, int] | None = None
        for c, held in enumerate(chosen):
            lacking = [b for b in range(floors[c], L) if b not in held]
            if not held or not lacking:
                continue
            a = max(held, key=lambda x: (excess[x], -x))  # ties: the deeper layer goes
            b = min(lacking, key=lambda x: (excess[x], x))  # ties: the shallower comes
            gap = excess[a] - excess[b]
            outside = excess[a] > 1 + 1e-9 or excess[b] < -1 - 1e-9  # a layer off by > 1
            if outside and gap > 1 + 1e-9 and (best is None or gap > best[0] + 1e-12):
                best = (gap, c, a, b)
        if best is None:
            return [sorted(s) for s in chosen]
        _, c, a, b = best
        chosen[c].remove(a)
        chosen[c].add(b)
        excess[a] -= 1
        excess[b] += 1


# Up to this many layers the numpy sampler's inclusion probabilities are computed exactly
# (2^L subsets); above, estimated from a fixed-seed Monte Carlo run.
EXACT_SEQUENTIAL_LAYERS = 12
SEQUENTIAL_DRAWS = 200_000


def sequential_inclusion(weights: np.ndarray, n: int) -> np.ndarray:
    """Per-layer inclusion probabilities of the authors' sampler,
    ``np.random.choice(L, n, replace=False, p=w)``: successive draws, each proportional to
    the weights of the layers not drawn yet. It is flatter than the shape (12-layer
    bottleneck, n = 9: a middle layer is drawn with probability ~0.5, not 1/3), so logging
    the exact sampler's probabilities as its expectation was wrong.

    Exact for up to ``EXACT_SEQUENTIAL_LAYERS`` layers: the probability of having drawn a set
    depends only on the set, so one pass over the subsets in order of size adds each set's
    probability times ``w_j / (W - w(set))`` to the set with ``j``. Above, the same law drawn
    ``SEQUENTIAL_DRAWS`` times with a fixed seed (standard error < 0.0012)."""
    return _sequential(tuple(float(x) for x in np.asarray(weights) / np.sum(weights)), int(n))


@lru_cache(maxsize=256)
def _sequential(w: tuple[float, ...], n: int) -> np.ndarray:
    L = len(w)
    n = min(n, L)
    if n == L:
        return np.ones(L)
    weights = np.asarray(w)
    if L > EXACT_SEQUENTIAL_LAYERS:
        # successive weighted draws = the n smallest Exp(1) / w_l (exponential races)
        rng = np.random.default_rng(0)
        keys = rng.exponential(size=(SEQUENTIAL_DRAWS, L)) / weights
        drawn = np.argpartition(keys, n - 1, axis=1)[:, :n]
        return np.bincount(drawn.ravel(), minlength=L) / SEQUENTIAL_DRAWS
    prob = np.zeros(1 << L)
    prob[0] = 1.0
    mass = np.zeros(1 << L)  # weight of the layers in each set
    size = np.zeros(1 << L, dtype=np.int64)
    for j in range(L):
        bit = 1 << j
        mass[bit : 2 * bit] = mass[:bit] + weights[j]
        size[bit : 2 * bit] = size[:bit] + 1
    inclusion = np.zeros(L)
    for k in range(n):
        for s in np.flatnonzero((size == k) & (prob > 0)):
            rest = 1.0 - mass[s]
            for j in range(L):
                if not s >> j & 1:
                    p = prob[s] * weights[j] / rest
                    prob[s | 1 << j] += p
                    inclusion[j] += p
    return inclusion
