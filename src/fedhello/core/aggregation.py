"""Masked per-layer aggregation and update validation (numpy only).

Each LoRA tensor of layer l is the weighted mean of the uploads of the clients that trained
layer l this round; a layer nobody trained keeps its value; the head, trained by everyone, is
averaged over everyone. Updates are validated *before* anything touches the global state: one
bad client is rejected with a reason and the round goes on with the others.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedhello.core.layers import keys_for_layers

logger = logging.getLogger(__name__)

State = dict[str, np.ndarray]


@dataclass
class ClientUpdate:
    """What one client uploads: its allocated layers' LoRA tensors and the head."""

    client: int
    layers: tuple[int, ...]
    num_examples: int
    tensors: Mapping[str, np.ndarray]
    train_loss: float = 0.0


@dataclass
class AggregationReport:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)  # client -> reason
    coverage: list[int] = field(default_factory=list)  # accepted clients per layer


def validate_update(
    update: ClientUpdate, global_state: Mapping[str, np.ndarray], layer_of: Mapping[str, int | None]
) -> str | None:
    """The reason to reject ``update``, or None if it is well formed."""
    if not isinstance(update.num_examples, int) or update.num_examples <= 0:
        return f"num_examples = {update.num_examples!r}: must be a positive integer"
    if not math.isfinite(update.train_loss):
        return f"training loss is {update.train_loss}: not finite"
    allowed = set(keys_for_layers(layer_of, update.layers))
    for key in sorted(update.tensors):
        if key not in global_state:
            return f"unknown tensor {key!r}"
        if key not in allowed:
            layers = list(update.layers)
            return f"tensor {key!r} of layer {layer_of[key]} outside the allocation {layers}"
    missing = allowed - set(update.tensors)
    if missing:
        return f"missing {len(missing)} allocated tensors, e.g. {sorted(missing)[0]!r}"
    for key, value in update.tensors.items():
        ref = global_state[key]
        if not isinstance(value, np.ndarray):
            return f"tensor {key!r} is a {type(value).__name__}, not an array"
        if value.shape != ref.shape:
            return f"tensor {key!r} has shape {value.shape}, expected {ref.shape}"
        if value.dtype != ref.dtype:
            return f"tensor {key!r} has dtype {value.dtype}, expected {ref.dtype}"
        if not np.isfinite(value).all():
            return f"tensor {key!r} has non-finite values"
    return None


def aggregate_masked(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    layer_of: Mapping[str, int | None],
    num_layers: int,
    weighted: bool = True,
) -> tuple[State, AggregationReport]:
    """New global state: per tensor, the (weighted) mean over the accepted uploads holding it."""
    report = AggregationReport(coverage=[0] * num_layers)
    good: list[ClientUpdate] = []
    for update in updates:
        reason = validate_update(update, global_state, layer_of)
        if reason is None:
            good.append(update)
            report.accepted.append(update.client)
            for layer in update.layers:
                report.coverage[layer] += 1
        else:
            report.rejected[update.client] = reason
            logger.warning("rejected the update of client %d: %s", update.client, reason)

    new_state: State = {}
    for key, old in global_state.items():
        holders = [u for u in good if key in u.tensors]
        if not holders:
            new_state[key] = old.copy()  # nobody trained it this round: keep
            continue
        weights = np.array([u.num_examples if weighted else 1.0 for u in holders], dtype=np.float64)
        stacked = np.stack([u.tensors[key].astype(np.float64) for u in holders])
        mean = np.tensordot(weights / weights.sum(), stacked, axes=1)
        new_state[key] = mean.astype(old.dtype)
    return new_state, report


class ServerMomentum:
    """FedAvgM: ``v = beta v + (avg - global)``, ``global += server_lr * v`` on updated tensors.

    With beta = 0 and server_lr = 1 this is plain FedAvg (the new state is the average).
    """

    def __init__(self, beta: float = 0.0, server_lr: float = 1.0) -> None:
        self.beta = beta
        self.server_lr = server_lr
        self.velocity: State = {}

    def step(self, old: Mapping[str, np.ndarray], averaged: State, updated: set[str]) -> State:
        if self.beta == 0.0 and self.server_lr == 1.0:
            return averaged
        out = dict(averaged)
        for key in updated:
            delta = averaged[key] - old[key]
            v = self.velocity.get(key)
            v = delta if v is None else self.beta * v + delta
            self.velocity[key] = v
            out[key] = (old[key] + self.server_lr * v).astype(old[key].dtype)
        return out
