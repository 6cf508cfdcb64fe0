"""``flexlora``: FlexLoRA (Bai et al., NeurIPS 2024), heterogeneous ranks recombined by SVD.
Implemented from the paper's definitions (its official branch never calls the per-client rank
change, so every client trains at one rank there; it is not a reference).

Each client trains every layer at its rank ``r_k``. Per LoRA module the server forms the
full-size update ``dW = sum_k p_k * scale * B_k A_k`` (``p_k`` the client's weight,
``federation.weighting``), takes its SVD ``dW = U diag(S) V^T`` and keeps the rank-
``r_max`` truncation as the global adapter: ``B = U[:, :r_max] diag(S[:r_max]) / scale``,
``A = V^T[:r_max, :]``. A client of rank ``r`` then receives the leading ``r`` components,
``U[:, :r] diag(S[:r]) / scale`` and ``V^T[:r, :]``: the best rank-``r`` approximation of
``dW`` (Eckart-Young). ``scale = alpha / r_max`` multiplies ``dW`` and divides ``B``, so it
cancels: the SVD is taken of ``sum_k p_k B_k A_k`` and the logged singular values are that
matrix's (multiply by ``alpha / r_max`` for the weight update's). Every round's record holds
each module's spectrum (SVD aggregation is known to concentrate energy in the smallest shared
rank: watch the values past the weakest client's rank).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedhello.core.aggregation import (
    AggregationReport,
    ClientUpdate,
    State,
    Weighting,
    example_weights,
)
from fedhello.core.allocation.base import register
from fedhello.core.allocation.ranked import RankAllocation
from fedhello.core.ranks import lora_pairs

logger = logging.getLogger(__name__)


def svd(dw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U, S, V^T`` of ``dw`` (thin): numpy's (LAPACK's divide-and-conquer gesdd), or where
    that does not converge, LAPACK's gesvd through scipy, slower but sturdier. gesdd failed
    on finite, well-scaled FlexLoRA sums here: a 576 x 576 sum of three clients' rank-10 and
    -16 products of SmolLM2 (entries up to 1e-3, 2026-12-07), which gesvd factors; where gesdd
    converges the result is its own, so runs that never met the failure are unchanged."""
    try:
        return np.linalg.svd(dw, full_matrices=False)
    except np.linalg.LinAlgError:
        import scipy.linalg

        logger.warning("FlexLoRA: gesdd's SVD of a %s sum did not converge; using gesvd", dw.shape)
        u, s, vt = scipy.linalg.svd(dw, full_matrices=False, lapack_driver="gesvd")
        return u, s, vt


def svd_recombine(
    products: Sequence[tuple[float, np.ndarray, np.ndarray]], rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B, A, S)``: the rank-``rank`` factors of ``sum p B A`` over ``(p, B, A)`` (``p``
    normalised here) and its full singular-value spectrum."""
    total = sum(p for p, _, _ in products)
    dw = sum((p / total) * (b.astype(np.float64) @ a.astype(np.float64)) for p, b, a in products)
    u, s, vt = svd(np.asarray(dw))
    return u[:, :rank] * s[:rank], vt[:rank, :], s


@register
class FlexLoRAAllocation(RankAllocation):
    name = "flexlora"

    def aggregate(
        self,
        global_state: State,
        updates: Sequence[ClientUpdate],
        layer_of: dict[str, int | None],
        weighting: Weighting,
    ) -> tuple[State, AggregationReport, dict[str, Any]]:
        good, report, state = self.accept_with_head(global_state, updates, layer_of, weighting)
        p = example_weights(good, weighting)
        spectra: dict[str, list[float]] = {}
        for module, (a_key, b_key) in lora_pairs(global_state).items():
            holders = [u for u in good if a_key in u.tensors and b_key in u.tensors]
            if not holders:  # nobody trained it this round: keep
                state[a_key], state[b_key] = global_state[a_key].copy(), global_state[b_key].copy()
                continue
            products = [(p[u.client], u.tensors[b_key], u.tensors[a_key]) for u in holders]
            rank = global_state[a_key].shape[0]
            b, a, s = svd_recombine(products, rank)
            state[b_key] = b.astype(global_state[b_key].dtype)
            state[a_key] = a.astype(global_state[a_key].dtype)
            spectra[f"{layer_of[a_key]}.{module.rsplit('.', 1)[-1]}"] = [
                float(f"{x:.5g}") for x in s[: 2 * rank]
            ]
        return {k: state[k] for k in global_state}, report, {"singular_values": spectra}
