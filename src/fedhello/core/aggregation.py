"""Masked per-layer aggregation and update validation (numpy only).

Each LoRA tensor of layer l is the weighted mean of the uploads of the clients that trained
layer l this round; a layer nobody trained keeps its value; the head, uploaded by everyone
(unless ``train.head`` keeps it frozen or local this round: then it keeps its value), is
averaged over everyone. Factors uploaded at a lower rank (rank methods) are zero-padded to the
global rank first. Updates are validated *before* anything touches the global state: one bad
client is rejected with a reason and the round goes on with the others. The rank methods'
own aggregations (HetLoRA, FlexLoRA) reuse ``accept`` and ``weighted_mean``.

A client's weight (``federation.weighting``, ``example_weights``): ``shard``, the examples in
its shard (FedAvg's ``n_k``); ``uniform``, 1 (the Fed-HeLLo authors' protocol);
``examples-seen``, the examples it trained on this round (local steps x batch size: equal for
all with fixed local steps, proportional to the work with local epochs). How the server then
moves the global state towards these means: ``fedhello.core.server_optimizers``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from fedhello.core.layers import AdapterSpec, keys_for_spec
from fedhello.core.ranks import expected_shape, pad, rank_of
from fedhello.core.schedule import num_local_steps

logger = logging.getLogger(__name__)

State = dict[str, np.ndarray]

Weighting = Literal["examples-seen", "shard", "uniform"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)


@dataclass
class ClientUpdate:
    """What one client uploads: its allocated layers' LoRA tensors and the head. ``rank`` and
    ``factors`` are what the server handed out (its ``AdapterSpec``): the factors may come back
    at that rank or lower (HetLoRA prunes), never higher."""

    client: int
    layers: tuple[int, ...]
    num_examples: int
    tensors: Mapping[str, np.ndarray]
    train_loss: float = 0.0
    rank: int | None = None
    factors: str = "AB"
    # examples trained on this round: local steps x batch size (every batch is full, repeats
    # counted); the weight under ``federation.weighting = "examples-seen"``
    examples_seen: int = 0
    # why the report that carried this update is unusable (a required field missing or of the
    # wrong type on the wire): the update is rejected with this reason, before anything else
    malformed: str | None = None
    # what the server asked of the head (``AdapterSpec.head``): only "federated" uploads it
    head: str = "federated"

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(self.layers, self.rank, self.factors, self.head)

    @property
    def upload_rank(self) -> int | None:
        """The rank of the uploaded factors (None: a full-rank spec)."""
        return None if self.rank is None else rank_of(self.tensors)


@dataclass
class AggregationReport:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)  # client -> reason
    coverage: list[int] = field(default_factory=list)  # accepted clients per layer


def validate_update(
    update: ClientUpdate,
    global_state: Mapping[str, np.ndarray],
    layer_of: Mapping[str, int | None],
    weighting: Weighting = "shard",
) -> str | None:
    """The reason to reject ``update``, or None if it is well formed (its weight under
    ``weighting`` positive)."""
    if update.malformed is not None:
        return update.malformed
    if not _count(update.num_examples) or update.num_examples <= 0:
        return f"num_examples = {update.num_examples!r}: must be a positive integer"
    seen = update.examples_seen
    if not _count(seen) or seen < 0 or (weighting == "examples-seen" and seen == 0):
        need = "positive" if weighting == "examples-seen" else "non-negative"
        return f"examples_seen = {seen!r}: must be a {need} integer"
    if not math.isfinite(update.train_loss):
        return f"training loss is {update.train_loss}: not finite"
    allowed = set(keys_for_spec(layer_of, update.spec))
    for key in sorted(update.tensors):
        if key not in global_state:
            return f"unknown tensor {key!r}"
        if key not in allowed:
            layers = list(update.layers)
            if layer_of[key] in update.layers:  # FFA-LoRA: an A factor
                return f"tensor {key!r} is frozen under FFA-LoRA: only B factors are uploaded"
            if layer_of[key] is None:  # the head, this round frozen or kept local
                return f"tensor {key!r} is the head, not uploaded this round (head {update.head})"
            return f"tensor {key!r} of layer {layer_of[key]} outside the allocation {layers}"
    missing = allowed - set(update.tensors)
    if missing:
        return f"missing {len(missing)} allocated tensors, e.g. {sorted(missing)[0]!r}"
    for key, value in update.tensors.items():
        if not isinstance(value, np.ndarray):
            return f"tensor {key!r} is a {type(value).__name__}, not an array"
    rank = None
    if update.rank is not None:
        try:
            rank = update.upload_rank
        except ValueError as err:
            return f"uploaded factors disagree: {err}"
        if rank is not None and not 1 <= rank <= update.rank:
            return f"factors of rank {rank}; allowed: 1..{update.rank} (the rank handed out)"
    for key, value in update.tensors.items():
        ref = global_state[key]
        want = expected_shape(key, ref.shape, rank)
        if value.shape != want:
            return f"tensor {key!r} has shape {value.shape}, expected {want}"
        if value.dtype != ref.dtype:
            return f"tensor {key!r} has dtype {value.dtype}, expected {ref.dtype}"
        if not np.isfinite(value).all():
            return f"tensor {key!r} has non-finite values"
    return None


def flag_misreported_work(
    updates: Sequence[ClientUpdate], batch_size: int, local_steps: int, local_epochs: float | None
) -> None:
    """Mark each update whose ``examples_seen`` is not the work the server asked of it.

    A client trains ``num_local_steps`` full batches (``local_steps``, or with
    ``local_epochs`` as many as its reported shard needs), so the count it reports can be
    checked rather than trusted: under ``weighting = "examples-seen"`` it is the client's
    weight, and a node that claimed 10x the work would outweigh the rest. An update with a
    wrong count is marked malformed (rejected with that reason before anything else); one
    whose counts are not integers is left for ``validate_update`` to reject."""
    for u in updates:
        if u.malformed is not None or not (_count(u.num_examples) and _count(u.examples_seen)):
            continue
        if u.num_examples <= 0:
            continue
        steps = num_local_steps(u.num_examples, batch_size, local_steps, local_epochs)
        want = steps * batch_size
        if u.examples_seen != want:
            u.malformed = (
                f"examples_seen = {u.examples_seen}: the round asked {steps} steps of "
                f"{batch_size} examples = {want}"
            )


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def accept(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    layer_of: Mapping[str, int | None],
    num_layers: int,
    weighting: Weighting = "shard",
) -> tuple[list[ClientUpdate], AggregationReport]:
    """The well-formed updates, and a report of who was accepted or rejected (and why)."""
    report = AggregationReport(coverage=[0] * num_layers)
    good: list[ClientUpdate] = []
    for update in updates:
        reason = validate_update(update, global_state, layer_of, weighting)
        if reason is None:
            good.append(update)
            report.accepted.append(update.client)
            for layer in update.layers:
                report.coverage[layer] += 1
        else:
            report.rejected[update.client] = reason
            logger.warning("rejected the update of client %d: %s", update.client, reason)
    return good, report


def example_weights(updates: Sequence[ClientUpdate], weighting: Weighting) -> dict[int, float]:
    """The weight of each client in the means (``federation.weighting``): its shard's example
    count (``shard``), 1 (``uniform``) or the examples it trained on this round
    (``examples-seen``)."""
    if weighting == "shard":
        return {u.client: float(u.num_examples) for u in updates}
    if weighting == "uniform":
        return {u.client: 1.0 for u in updates}
    if weighting == "examples-seen":
        return {u.client: float(u.examples_seen) for u in updates}
    raise ValueError(f"weighting = {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")


def weighted_mean(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    weight_of: Mapping[int, float],
    keys: Sequence[str] | None = None,
) -> State:
    """Per tensor (of ``keys``, default all), the mean of the uploads holding it weighted by
    ``weight_of[client]``, each zero-padded to the global shape; a tensor nobody uploaded
    keeps its value (so do all weights zero)."""
    new_state: State = {}
    for key in global_state if keys is None else keys:
        old = global_state[key]
        holders = [u for u in updates if key in u.tensors]
        weights = np.array([weight_of[u.client] for u in holders], dtype=np.float64)
        if not holders or weights.sum() <= 0:
            new_state[key] = old.copy()  # nobody trained it this round: keep
            continue
        stacked = np.stack(
            [pad(key, u.tensors[key], old.shape).astype(np.float64) for u in holders]
        )
        mean = np.tensordot(weights / weights.sum(), stacked, axes=1)
        new_state[key] = mean.astype(old.dtype)
    return new_state


def aggregate_masked(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    layer_of: Mapping[str, int | None],
    num_layers: int,
    weighting: Weighting = "shard",
) -> tuple[State, AggregationReport]:
    """New global state: per tensor, the weighted mean over the accepted uploads holding it."""
    good, report = accept(global_state, updates, layer_of, num_layers, weighting)
    return weighted_mean(global_state, good, example_weights(good, weighting)), report
