"""LoRA ranks on the aggregation boundary: truncation, zero-padding, factor pairs (numpy only).

The global adapter has rank ``r_max`` (``lora.r``) on every module: ``A`` is ``r_max x in``,
``B`` is ``out x r_max``. A rank method hands client k the leading ``r_k`` components,
``A[:r_k, :]`` and ``B[:, :r_k]``, and receives factors of rank ``r_k`` (or smaller, after
HetLoRA's pruning) back; the server zero-pads them to ``r_max`` before averaging.

Scaling is rank-independent: PEFT scales a module by ``alpha / r`` with the ``r`` it was
built with, and fedhello builds every module at ``r_max`` and only ever slices its factors, so
a client's rank-``r_k`` slice is scaled by ``alpha / r_max`` exactly as the whole adapter is
(the exported adapter says ``r = r_max``, so plain PEFT applies the same scale).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedhello.core.layers import lora_factor


def rank_for_budget(budget: int, num_layers: int, r_max: int, min_rank: int = 1) -> int:
    """The rank with as many trainable LoRA parameters on all ``num_layers`` layers as
    ``budget`` layers at ``r_max``: a module's factors hold ``r (in + out)`` parameters, so
    ``budget * r_max = num_layers * r``; e.g. 6 of 12 layers at rank 16 is rank 8 on all 12
    (rounded to the nearest rank, at least ``min_rank``)."""
    n = min(max(budget, 0), num_layers)
    return max(min_rank, min(r_max, math.floor(r_max * n / num_layers + 0.5)))


def truncate(state: Mapping[str, np.ndarray], rank: int | None) -> dict[str, np.ndarray]:
    """The leading ``rank`` components of every LoRA factor (the head unchanged); ``rank``
    None (or the full rank) returns the tensors as they are."""
    out = {}
    for key, value in state.items():
        factor = lora_factor(key)
        if rank is None or factor is None:
            out[key] = value
        elif factor == "A":
            out[key] = value[:rank, :]
        else:
            out[key] = value[:, :rank]
    return out


def expected_shape(key: str, full_shape: tuple[int, ...], rank: int | None) -> tuple[int, ...]:
    """The shape of tensor ``key`` at ``rank`` (None: the full shape)."""
    factor = lora_factor(key)
    if rank is None or factor is None:
        return full_shape
    return (rank, full_shape[1]) if factor == "A" else (full_shape[0], rank)


def pad(key: str, value: np.ndarray, full_shape: tuple[int, ...]) -> np.ndarray:
    """``value`` zero-padded along its rank axis to ``full_shape`` (a no-op at full rank)."""
    if value.shape == full_shape:
        return value
    out = np.zeros(full_shape, dtype=value.dtype)
    if lora_factor(key) == "A":
        out[: value.shape[0], :] = value
    else:
        out[:, : value.shape[1]] = value
    return out


def rank_of(tensors: Mapping[str, np.ndarray]) -> int | None:
    """The rank of uploaded factors (their common rank axis length), None without any; a
    ValueError if two factors disagree."""
    ranks = set()
    for key, value in tensors.items():
        factor = lora_factor(key)
        if factor is not None and value.ndim == 2:
            ranks.add(value.shape[0] if factor == "A" else value.shape[1])
    if len(ranks) > 1:
        raise ValueError(f"factors of different ranks {sorted(ranks)}")
    return ranks.pop() if ranks else None


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``module -> (A key, B key)`` for every LoRA module among ``keys`` (the module: the
    name before ``.lora_A.``, e.g. ``...layer.0.attention.self.query``)."""
    a_keys, b_keys = {}, {}
    for key in keys:
        factor = lora_factor(key)
        if factor == "A":
            a_keys[key.split(".lora_A.")[0]] = key
        elif factor == "B":
            b_keys[key.split(".lora_B.")[0]] = key
    return {m: (a_keys[m], b_keys[m]) for m in a_keys if m in b_keys}


def product_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """``||B A||_F`` over every module whose factors are in ``tensors`` (the root of the sum
    of squares: the Frobenius norm of the block-diagonal update of the whole adapter)."""
    total = 0.0
    for a_key, b_key in lora_pairs(tensors).values():
        prod = tensors[b_key].astype(np.float64) @ tensors[a_key].astype(np.float64)
        total += float(np.sum(prod * prod))
    return math.sqrt(total)
