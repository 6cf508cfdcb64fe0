"""Head policies (``train.head``): what the clients do with the classification head each
round, and FedNCM's head built by the server from class means. Pure numpy: no torch.

- ``federated`` (``auto``'s fallback, and every run's before ``auto``): every client trains
  and uploads the head; the server averages it like any tensor.
- ``frozen`` (FedBABU, Oh et al. 2022): the head stays at its initialisation while the body
  (LoRA) trains; clients neither train nor upload it. For the last ``head_finetune_rounds``
  rounds it is ``federated`` (FedBABU's fine-tuning at the end).
- ``class-means`` (FedNCM, Legate et al. 2023): before round 1 (round 0) every client sends,
  per class, the sum ``s_kc`` of the features the head reads and their count ``n_kc``
  (``fedhello.model.class_means``); the server sets row c of the head's weight to
  ``mu_c / ||mu_c||``, ``mu_c = sum_k s_kc / sum_k n_kc``, and its bias to 0 (a class nobody
  holds keeps its initial row and bias). Then it is ``frozen`` as above (FedNCM-FT:
  ``head_finetune_rounds = "all"``). The logits are ``||x|| cos(w_c, x)``: unit-norm rows
  times the raw features, as FedNCM uses them, so their scale is the features' norm (small
  logits are fine: the fine-tuning or the LoRA training adapts).
- ``local`` (the Fed-HeLLo authors' code): each client trains the head from the global one
  every round but never uploads it; the server never averages it, so the global head stays
  at its initialisation, and the global model is evaluated with that initial head.
- ``auto`` (the default): ``class-means`` trained every round (FedNCM-FT) where it applies,
  else ``federated``; with ``train.loss = "auto"`` (logit-adjusted, FedLC, for a classifier)
  it is the label skew recipe that reached 0.93 of the centralised reference on the
  pathological split where the averaged head alone reached 0.82 (docs/RESULTS.md section 6,
  seed 0; 0.93 against 0.78 on seed 1).
  It applies to a task whose head has a row per class and is one linear layer, without
  client-level DP (whose accountant does not cover round 0's class sums); a multiple-choice
  or language-model task, a non-linear head (``model.pooling = "head"`` on RoBERTa) or a
  private run gets ``federated``. The engine resolves it once the model is built
  (``auto_head``) and records what it chose in ``summary.json``; the run's config.toml keeps
  ``auto``, as it does for the pooling and the precision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

HEAD_POLICIES = ("federated", "frozen", "class-means", "local")
AUTO = "auto"  # train.head and train.loss: the label skew recipe where it applies


def auto_head(class_rows: bool, private: bool) -> tuple[str, int | str]:
    """``(train.head, train.head_finetune_rounds)`` that ``train.head = "auto"`` stands for:
    FedNCM-FT (class means, then the head trained every round) for a head with a linear row
    per class in a run without DP, else the averaged head.

    >>> auto_head(class_rows=True, private=False), auto_head(class_rows=True, private=True)
    (('class-means', 'all'), ('federated', 0))
    """
    return ("class-means", "all") if class_rows and not private else ("federated", 0)


def auto_loss(class_rows: bool) -> str:
    """The loss ``train.loss = "auto"`` stands for: FedLC's logit adjustment for a task whose
    labels are classes a client may lack, else cross-entropy."""
    return "logit-adjusted" if class_rows else "cross-entropy"


def head_mode(policy: str, round_: int, rounds: int, finetune_rounds: int = 0) -> str:
    """What the clients of ``round_`` (1..``rounds``) do with the head under ``policy`` (one
    resolved from ``auto``), its last ``finetune_rounds`` trained (``TrainConfig.finetune_rounds``):
    one of ``fedhello.core.layers.HEAD_MODES`` (``federated``, ``frozen``, ``local``).

    >>> [head_mode("frozen", r, 5, 2) for r in range(1, 6)]
    ['frozen', 'frozen', 'frozen', 'federated', 'federated']
    """
    if policy not in HEAD_POLICIES:
        raise ValueError(f"train.head = {policy!r}; allowed: {', '.join(HEAD_POLICIES)}")
    if policy in ("federated", "local"):
        return policy
    return "federated" if round_ > rounds - finetune_rounds else "frozen"


@dataclass(frozen=True)
class ClassSums:
    """What one client sends in FedNCM's round 0: per class, the sum of the features the head
    reads (classes x features, float64) and how many examples were summed (classes, int)."""

    client: int
    sums: np.ndarray
    counts: np.ndarray


def linear_head_keys(
    state: Mapping[str, np.ndarray], layer_of: Mapping[str, int | None]
) -> tuple[str, str | None]:
    """``(weight key, bias key or None)`` of a linear head in ``state``: the tensors outside
    the blocks must be one weight (classes x features) and at most one bias (classes)."""
    head = [k for k in state if layer_of.get(k) is None]
    weights = [k for k in head if state[k].ndim == 2]
    biases = [k for k in head if state[k].ndim == 1]
    if (
        len(weights) != 1
        or len(biases) > 1
        or len(head) != len(weights) + len(biases)
        or (biases and state[biases[0]].shape[0] != state[weights[0]].shape[0])
    ):
        shapes = {k: list(state[k].shape) for k in head}
        raise ValueError(
            f"train.head = 'class-means' needs a linear head (one weight classes x features, at "
            f"most one bias); this model's head tensors are {shapes}"
        )
    return weights[0], biases[0] if biases else None


def sums_problem(s: ClassSums, shape: tuple[int, ...]) -> str | None:
    """Why a client's class sums cannot be used (None: usable); ``shape``: the head weight's."""
    sums, counts = np.asarray(s.sums), np.asarray(s.counts)
    if sums.shape != shape or counts.shape != shape[:1]:
        return f"sums {list(sums.shape)} and counts {list(counts.shape)}; expected {list(shape)}"
    if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        return "counts must be non-negative integers"
    if not np.issubdtype(sums.dtype, np.floating):  # np.isfinite refuses e.g. strings
        return f"sums have dtype {sums.dtype}; allowed: floating point"
    if not np.isfinite(sums).all():
        return "sums have non-finite values"
    if ((counts == 0) & (sums != 0).any(axis=1)).any():  # they would skew the class's mean
        return "non-zero sums for a class counted 0 times"
    return None


def class_means_head(
    state: Mapping[str, np.ndarray],
    layer_of: Mapping[str, int | None],
    client_sums: Sequence[ClassSums],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The global state with FedNCM's head, and what the round-0 record shows.

    ``w_c = mu_c / ||mu_c||``, ``mu_c = sum_k s_kc / sum_k n_kc`` (float64, clients summed in
    client order), bias 0; a class no client holds (or whose mean is zero) keeps its initial
    row and bias. A client whose sums are malformed is left out, with its reason."""
    w_key, b_key = linear_head_keys(state, layer_of)
    weight = state[w_key]
    total = np.zeros(weight.shape, dtype=np.float64)
    count = np.zeros(weight.shape[0], dtype=np.float64)
    used, rejected = [], {}
    for s in sorted(client_sums, key=lambda s: s.client):
        reason = sums_problem(s, weight.shape)
        if reason is not None:
            rejected[str(s.client)] = reason
            continue
        total += np.asarray(s.sums, dtype=np.float64)
        count += np.asarray(s.counts, dtype=np.float64)
        used.append(s.client)
    held = count > 0
    mu = np.zeros_like(total)
    mu[held] = total[held] / count[held, None]
    norms = np.linalg.norm(mu, axis=1)
    built = held & (norms > 0)
    new_weight = weight.copy()
    new_weight[built] = (mu[built] / norms[built, None]).astype(weight.dtype)
    new = dict(state)
    new[w_key] = new_weight
    if b_key is not None:
        bias = state[b_key].copy()
        bias[built] = 0
        new[b_key] = bias
    info: dict[str, Any] = {
        "clients": used,
        "examples": int(count.sum()),
        "classes_built": int(built.sum()),
        "classes_kept": [int(c) for c in np.flatnonzero(~built)],
    }
    if rejected:
        info["rejected"] = rejected
    return new, info
