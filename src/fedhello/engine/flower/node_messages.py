"""The node's half of the wire format (the contract is ``messages``' docstring): what a node
may declare, a request read into a ``Request``, and each reply built.

Split from the server's half (``messages``: requests built, replies read) along the line the
messages cross: each side's code reads against the contract without the other side's, and the
ClientApp, which every SuperNode process imports, loads only what a node runs. The keys a node
may declare are here because the node reads them from its ``--node-config``; the server
imports them only to name them when it refuses a declaration (``declarations``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedhello.core.aggregation import State
from fedhello.core.layers import AdapterSpec
from fedhello.engine.flower.arrays import from_record, to_record
from fedhello.engine.flower.report_wire import encode_report
from fedhello.model.report import ClientResult

# What a node may declare in its --node-config, and how each value is read (budget-cost and
# budget-memory are retired: read so that the server refuses them rather than ignores them).
DECLARED_INT = ("partition-id", "budget-layers", "budget-tier")
DECLARED_FLOAT = ("budget-cost", "budget-memory", *["budget-memory-mb", "budget-step-seconds"],
                  "budget-upload-mb")  # fmt: skip
# Limits in real units: a node declaring memory or time measures its own cost profile.
MEASURED_LIMITS = ("budget-memory-mb", "budget-step-seconds")
# A node's own device settings (else the run's ``train`` settings apply on it).
NODE_DEVICE_KEYS = ("device", "precision", "base-precision")
DECLARED_STR = ("data", "profile-dir", *NODE_DEVICE_KEYS)
T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    """What a train, evaluate or query message asks of a node."""

    config_toml: str | None
    label_names: list[str]
    client: int | None = None
    round: int | None = None
    layers: tuple[int, ...] = ()
    lr: float | None = None
    state: State | None = None
    rank: int | None = None
    factors: str = "AB"
    rows: np.ndarray | None = None  # a partition node's shard, sent by the server
    head: str = "federated"
    clip_norm: float | None = None  # client-level DP: the norm to clip the update to

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(self.layers, self.rank, self.factors, self.head)


def _get(config: ConfigRecord, key: str, cast: Callable[[Any], T]) -> T | None:
    return cast(config[key]) if key in config else None


def read_request(msg: Message) -> Request:
    config = msg.content.config_records.get("config", ConfigRecord())
    arrays = msg.content.array_records.get("arrays")
    rows = msg.content.array_records.get("rows")
    layers: Any = config.get("train-layers", [])
    names: Any = config.get("label-names", [])
    return Request(
        config_toml=_get(config, "fedhello-config", str),
        label_names=[str(x) for x in names],
        client=_get(config, "client", int),
        round=_get(config, "server-round", int),
        layers=tuple(int(x) for x in layers),
        lr=_get(config, "lr", float),
        state=from_record(arrays) if arrays is not None else None,
        rank=_get(config, "train-rank", int),
        factors=str(config.get("train-factors", "AB")),
        rows=rows["rows"].numpy() if rows is not None and "rows" in rows else None,
        head=str(config.get("train-head", "federated")),
        clip_norm=_get(config, "dp-clip-norm", float),
    )


def declared(node_config: Mapping[str, Any]) -> dict[str, int | float | str]:
    """What a node's ``--node-config`` declares, typed, for its query reply. A value that
    is not of its key's type becomes ``config-error`` naming the key, the value and the type
    (the server stops the run on it, naming the node), not an exception in the ClientApp,
    which would reach the server without the key."""
    info: dict[str, int | float | str] = {}
    kinds = [(DECLARED_INT, int, "an integer"), (DECLARED_FLOAT, float, "a number")]
    for keys, cast, kind in kinds:
        for key in keys:
            if key not in node_config:
                continue
            value = node_config[key]
            try:
                if isinstance(value, bool) or (cast is int and isinstance(value, float)):
                    raise ValueError(value)
                info[key] = cast(value)
            except (TypeError, ValueError):
                info["config-error"] = f"--node-config {key}={value!r}; allowed: {kind}"
                return info
    for key in DECLARED_STR:
        if key in node_config:
            info[key] = str(node_config[key])
    return info


def query_reply(msg: Message, info: Mapping[str, int | float | str]) -> Message:
    return Message(RecordDict({"config": ConfigRecord(dict(info))}), reply_to=msg)


def train_reply(msg: Message, result: ClientResult) -> Message:
    metrics, config = encode_report(result)
    content = RecordDict({
        "arrays": to_record(result.update.tensors),
        "metrics": MetricRecord(metrics),
        "config": ConfigRecord(config),
    })  # fmt: skip
    return Message(content, reply_to=msg)


def class_means_reply(msg: Message, sums: np.ndarray, counts: np.ndarray) -> Message:
    arrays = ArrayRecord({
        "sums": Array(np.ascontiguousarray(sums, dtype=np.float64)),
        "counts": Array(np.ascontiguousarray(counts, dtype=np.int64)),
    })  # fmt: skip
    return Message(RecordDict({"arrays": arrays}), reply_to=msg)


def evaluate_reply(msg: Message, scores: Mapping[str, int | float]) -> Message:
    metrics: dict[str, Any] = {k.replace("_", "-"): v for k, v in scores.items()}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
