"""The wire format between the fedhello ServerApp and ClientApp: every Flower message and key
is built and read here, and nowhere else.

Client contract (keys are kebab-case):

* **query** (once per node, at the start; ``discovery``): ``config`` = ``fedhello-config``
  (the resolved config as TOML) and ``label-names``. Reply ``config`` = what the node's
  ``--node-config`` declares: ``partition-id`` and/or ``data`` (its own file), optionally a
  budget (``budget-layers``, ``budget-tier``, ``budget-cost``, ``budget-memory``, or limits in
  real units: ``budget-memory-mb``, ``budget-step-seconds``, ``budget-upload-mb``) and its
  own ``device``, ``precision`` and ``base-precision`` (else the run's); the reply adds the
  resolved ``device`` and ``precision``, or ``device-error`` (e.g. ``cuda`` on a node without
  one); a node with its own file adds ``site-examples`` and ``site-validation`` (its train /
  held-out sizes) or ``data-error`` (why the file is unusable); a node with a memory or time
  limit adds ``cost-profile`` (its profile as JSON, measured on its own device) or
  ``profile-error``. The server stops the run on any error, before round 1.
* **train**: ``arrays`` = the global adapter (every LoRA tensor and the head: the forward
  pass needs them all), truncated to ``train-rank`` where the message has one (rank
  methods); ``config`` = ``server-round``, ``client`` (the server's id for the node),
  ``train-layers`` (block indices), ``train-tensors`` (``AB``, or ``B`` under FFA-LoRA),
  ``lr``, ``fedhello-config``, ``label-names`` (a site holds no copy of the configured
  dataset). Reply ``arrays`` = exactly the tensors of that spec
  (``fedhello.core.layers.keys_for_spec``), at ``train-rank`` or lower (HetLoRA prunes);
  ``metrics`` = ``num-examples``, ``train-loss``, ``seconds``, ``step-seconds``,
  ``peak-memory-mb``, ``train-memory-mb``, ``trainable-params``, ``steps`` and, on CUDA,
  ``device-peak-memory-mb``; ``config`` = ``device``, ``precision`` (what this node
  trained on, recorded per client). The server validates every upload before it touches
  the global state.
* **evaluate** (sites, after the last round): ``arrays`` and ``config`` as for training
  (``client``, ``fedhello-config``, ``label-names``); reply ``metrics`` = ``num-examples``,
  ``accuracy``, ``macro-f1``, ``loss`` on the site's held-out rows. Only scores leave a site.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedhello.core.aggregation import ClientUpdate, State
from fedhello.core.layers import AdapterSpec
from fedhello.model.lora import state_nbytes
from fedhello.model.training import ClientResult

# What a node may declare in its --node-config, and how each value is read.
DECLARED_INT = ("partition-id", "budget-layers", "budget-tier")
DECLARED_FLOAT = ("budget-cost", "budget-memory", *["budget-memory-mb", "budget-step-seconds"],
                  "budget-upload-mb")  # fmt: skip
# Limits in real units: a node declaring memory or time measures its own cost profile.
MEASURED_LIMITS = ("budget-memory-mb", "budget-step-seconds")
# A node's own device settings (else the run's ``train`` settings apply on it).
NODE_DEVICE_KEYS = ("device", "precision", "base-precision")
DECLARED_STR = ("data", "profile-dir", *NODE_DEVICE_KEYS)
T = TypeVar("T")


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    return {k: v.numpy() for k, v in record.items()}


def _task(config_toml: str, label_names: Sequence[str]) -> dict[str, Any]:
    return {"fedhello-config": config_toml, "label-names": list(label_names)}


# ---- server side: build requests, read replies ----------------------------------------------


def query_message(node: int, config_toml: str, label_names: Sequence[str]) -> Message:
    content = RecordDict({"config": ConfigRecord(_task(config_toml, label_names))})
    return Message(content, dst_node_id=node, message_type=MessageType.QUERY)


def read_query_reply(reply: Message) -> dict[str, Any]:
    return dict(reply.content.config_records["config"])


def train_message(
    node: int, arrays: ArrayRecord, round_: int, client: int, spec: AdapterSpec, lr: float,
    config_toml: str, label_names: Sequence[str],
) -> Message:  # fmt: skip
    config = ConfigRecord({
        "server-round": round_, "client": client, "train-layers": list(spec.layers), "lr": lr,
        "train-tensors": spec.tensors, **_task(config_toml, label_names),
    })  # fmt: skip
    if spec.rank is not None:
        config["train-rank"] = spec.rank
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def read_train_reply(
    reply: Message, client: int, spec: AdapterSpec, bytes_down: int
) -> ClientResult:
    """A ClientResult from a train reply (for the ``spec`` the client was handed); validation
    happens later, in aggregation."""
    metrics: dict[str, Any] = dict(reply.content.metric_records.get("metrics", {}))
    info: dict[str, Any] = dict(reply.content.config_records.get("config", {}))
    tensors = from_record(reply.content.array_records.get("arrays", ArrayRecord()))
    device_peak = metrics.get("device-peak-memory-mb")
    update = ClientUpdate(
        client=client,
        layers=spec.layers,
        num_examples=int(metrics.get("num-examples", 0)),
        tensors=tensors,
        train_loss=float(metrics.get("train-loss", float("nan"))),
        rank=spec.rank,
        kind=spec.tensors,
    )
    return ClientResult(
        update=update,
        seconds=float(metrics.get("seconds", 0.0)),
        step_seconds=float(metrics.get("step-seconds", 0.0)),
        peak_memory_mb=float(metrics.get("peak-memory-mb", 0.0)),
        train_memory_mb=float(metrics.get("train-memory-mb", 0.0)),
        trainable_params=int(metrics.get("trainable-params", 0)),
        bytes_up=state_nbytes(tensors),
        bytes_down=bytes_down,
        steps=int(metrics.get("steps", 0)),
        device=str(info.get("device", "unknown")),
        precision=str(info.get("precision", "unknown")),
        device_peak_memory_mb=None if device_peak is None else float(device_peak),
    )


def evaluate_message(
    node: int, arrays: ArrayRecord, client: int, config_toml: str, label_names: Sequence[str]
) -> Message:
    config = ConfigRecord({"client": client, **_task(config_toml, label_names)})
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)


def read_evaluate_reply(reply: Message) -> dict[str, Any]:
    """A site's scores, snake_case keys (``num_examples``, ``accuracy``, ``macro_f1``, ...)."""
    metrics: dict[str, Any] = dict(reply.content.metric_records.get("metrics", {}))
    return {k.replace("-", "_"): v for k, v in metrics.items()}


# ---- client side: read requests, build replies ----------------------------------------------


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
    tensors: str = "AB"

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(self.layers, self.rank, self.tensors)


def _get(config: ConfigRecord, key: str, cast: Callable[[Any], T]) -> T | None:
    return cast(config[key]) if key in config else None


def read_request(msg: Message) -> Request:
    config = msg.content.config_records.get("config", ConfigRecord())
    arrays = msg.content.array_records.get("arrays")
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
        tensors=str(config.get("train-tensors", "AB")),
    )


def declared(node_config: Mapping[str, Any]) -> dict[str, int | float | str]:
    """What a node's ``--node-config`` declares, typed, for its query reply."""
    info: dict[str, int | float | str] = {}
    for key in DECLARED_INT:
        if key in node_config:
            info[key] = int(node_config[key])
    for key in DECLARED_FLOAT:
        if key in node_config:
            info[key] = float(node_config[key])
    for key in DECLARED_STR:
        if key in node_config:
            info[key] = str(node_config[key])
    return info


def query_reply(msg: Message, info: Mapping[str, int | float | str]) -> Message:
    return Message(RecordDict({"config": ConfigRecord(dict(info))}), reply_to=msg)


def train_reply(msg: Message, result: ClientResult) -> Message:
    u = result.update
    metrics: dict[str, Any] = {
        "num-examples": u.num_examples,
        "train-loss": float(u.train_loss),
        "seconds": result.seconds,
        "step-seconds": result.step_seconds,
        "peak-memory-mb": result.peak_memory_mb,
        "train-memory-mb": result.train_memory_mb,
        "trainable-params": result.trainable_params,
        "steps": result.steps,
    }
    if result.device_peak_memory_mb is not None:
        metrics["device-peak-memory-mb"] = result.device_peak_memory_mb
    content = RecordDict({
        "arrays": to_record(u.tensors),
        "metrics": MetricRecord(metrics),
        "config": ConfigRecord({"device": result.device, "precision": result.precision}),
    })  # fmt: skip
    return Message(content, reply_to=msg)


def evaluate_reply(msg: Message, scores: Mapping[str, int | float]) -> Message:
    metrics: dict[str, Any] = {k.replace("_", "-"): v for k, v in scores.items()}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
