"""The wire format between the fedhello ServerApp and ClientApp: every Flower message and key
is built and read here, and nowhere else.

Client contract (keys are kebab-case):

* **query** (once per node, at the start; ``discovery``): ``config`` = ``fedhello-config``
  (the resolved config as TOML) and ``label-names``. Reply ``config`` = what the node's
  ``--node-config`` declares: ``partition-id`` and/or ``data`` (its own file), optionally a
  budget (``budget-layers``, ``budget-tier``, or limits in real units: ``budget-memory-mb``,
  ``budget-step-seconds``, ``budget-upload-mb``; the retired ``budget-cost`` and
  ``budget-memory`` are passed on for the server to refuse, naming what replaces them) and its
  own ``device``, ``precision`` and ``base-precision`` (else the run's), or ``config-error``
  (a value not of its key's type, named with the key); the reply adds the
  resolved ``device`` and ``precision``, or ``device-error`` (e.g. ``cuda`` on a node without
  one); a node with its own file adds ``site-examples`` and ``site-validation`` (its train /
  held-out sizes) or ``data-error`` (why the file is unusable); a node with a memory or time
  limit adds ``cost-profile`` (its profile as JSON, measured on its own device) or
  ``profile-error``. The server stops the run on any error, before round 1.
* **train**: ``arrays`` = the global adapter (every LoRA tensor and the head: the forward
  pass needs them all), truncated to ``train-rank`` where the message has one (rank
  methods); ``config`` = ``server-round``, ``client`` (the server's id for the node),
  ``train-layers`` (block indices), ``train-factors`` (``AB``, or ``B`` under FFA-LoRA),
  ``train-head`` (``federated``: train and upload the head; ``frozen``: neither; ``local``:
  train it, upload it not; a message without it means ``federated``),
  ``lr``, ``fedhello-config``, ``label-names`` (a site holds no copy of the configured
  dataset); for a partition node, ``rows`` = an array record whose ``rows`` are the
  positions of its shard in the configured dataset (as the server split it), so the node
  reads that dataset but never partitions it. The node derives the method's client hooks
  from the config, as the embedded engine does. Reply ``arrays`` = exactly the tensors of that spec
  (``fedhello.core.layers.keys_for_spec``), at ``train-rank`` or lower (HetLoRA prunes),
  and the client's report (``fedhello.model.report.REPORT``, one key per field the client
  measures, its name in kebab-case): numbers in ``metrics`` = ``num-examples`` (int),
  ``train-loss``, ``seconds``, ``step-seconds``, ``peak-memory-mb``, ``train-memory-mb``
  (floats), ``trainable-params``, ``steps``, ``examples-seen`` (ints), on an accelerator
  ``device-peak-memory-mb`` (CUDA's allocator peak; MPS's largest sampled allocation) and,
  in fp16 only, ``skipped-steps`` (int: overflowed steps the loss scaler did not apply);
  strings in ``config`` = ``device``, ``precision`` (what this node trained on, recorded per
  client). Every field but ``device-peak-memory-mb`` and ``skipped-steps`` is required: a
  reply missing one, or carrying it with the wrong type, is rejected with a
  reason naming it (the round goes on with the other clients). The server counts
  ``bytes_up`` and ``bytes_down`` itself, and validates every upload before it touches the
  global state.
* **query.class_means** (``train.head = "class-means"``: once, before round 1, to every
  node): ``arrays`` and ``config`` as for training (``client``, ``fedhello-config``,
  ``label-names``, a partition node's ``rows``). Reply ``arrays`` = ``sums`` (classes x
  features, float64: per class, the sum of the head's input features over the node's
  examples, ``fedhello.model.class_means``) and ``counts`` (classes, int64). Only these sums
  and counts leave the node.
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

from fedhello.core.aggregation import State
from fedhello.core.layers import AdapterSpec
from fedhello.engine.flower.arrays import from_record, read_array, read_arrays, to_record
from fedhello.model.lora import state_nbytes
from fedhello.model.report import SENT, ClientResult, ReportField

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
    config_toml: str, label_names: Sequence[str], rows: np.ndarray | None = None,
    clip_norm: float | None = None,
) -> Message:  # fmt: skip
    """The train message of one client; ``rows``: a partition node's shard (positions in the
    configured dataset), None for a site, which trains on its own file; ``clip_norm``: the
    round's DP clip norm, which the node applies to its update before it replies (where the
    run's ``privacy.clip_on`` is the client)."""
    config = ConfigRecord({
        "server-round": round_, "client": client, "train-layers": list(spec.layers), "lr": lr,
        "train-factors": spec.factors, "train-head": spec.head, **_task(config_toml, label_names),
    })  # fmt: skip
    if spec.rank is not None:
        config["train-rank"] = spec.rank
    if clip_norm is not None:
        config["dp-clip-norm"] = clip_norm
    content = RecordDict({"arrays": arrays, "config": config})
    if rows is not None:
        content["rows"] = ArrayRecord({"rows": Array(np.asarray(rows, dtype=np.int64))})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def read_train_reply(
    reply: Message, client: int, spec: AdapterSpec, bytes_down: int
) -> ClientResult:
    """A ClientResult from a train reply (for the ``spec`` the client was handed). A report
    field missing or of the wrong type, or an array that does not decode (``read_arrays``),
    marks the update malformed (rejected in aggregation, with the reason naming the field or
    the array's key); the rest is validated there too (what the server knows better than the
    node, e.g. its example count, by ``FlowerEngine.collect``)."""
    metrics = reply.content.metric_records.get("metrics", MetricRecord())
    info = reply.content.config_records.get("config", ConfigRecord())
    tensors, unreadable = read_arrays(reply.content.array_records.get("arrays", ArrayRecord()))
    values, problems = decode_report(metrics, info)
    problems += unreadable
    values |= {"bytes_up": state_nbytes(tensors), "bytes_down": bytes_down}  # the server's count
    malformed = "malformed reply: " + "; ".join(problems) if problems else None
    update = {"client": client, "layers": spec.layers, "tensors": tensors, "rank": spec.rank,
              "factors": spec.factors, "malformed": malformed, "head": spec.head}  # fmt: skip
    return ClientResult.assemble(values, update)


def wire_key(f: ReportField) -> str:
    return f.name.replace("_", "-")


def _record_of(f: ReportField) -> str:
    """Strings travel in the reply's ConfigRecord (a MetricRecord holds numbers only)."""
    return "config" if f.type is str else "metrics"


def encode_report(result: ClientResult) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, config)`` of a train reply: every field the client measures, by its wire key
    (an optional field without a value is left out)."""
    out: dict[str, dict[str, Any]] = {"metrics": {}, "config": {}}
    for f in SENT:
        value = getattr(result, f.name)
        if value is not None:
            out[_record_of(f)][wire_key(f)] = f.type(value)
    return out["metrics"], out["config"]


def decode_report(
    metrics: Mapping[str, Any], config: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Every field the client measures, read and type-checked, and what is wrong with the
    reply: a required field missing or any field of the wrong type (each problem names the
    key; such a field takes its declared default)."""
    records = {"metrics": metrics, "config": config}
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in SENT:
        where, key = _record_of(f), wire_key(f)
        values[f.name] = f.default
        if key not in records[where]:
            if f.required:
                problems.append(f"required {where} {key!r} is missing ({_describe(f)})")
            continue
        raw = records[where][key]
        if not _fits(raw, f.type):
            problems.append(
                f"{where} {key!r} = {raw!r} ({type(raw).__name__}); expected {_describe(f)}"
            )
            continue
        values[f.name] = f.type(raw)
    return values, problems


def _fits(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python, never a count or a measure
        return False
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _describe(f: ReportField) -> str:
    unit = f" in {f.unit}" if f.unit else ""
    return f"{f.type.__name__}{unit}: {f.doc}"


CLASS_MEANS = f"{MessageType.QUERY}.class_means"  # the message type of FedNCM's round 0


def class_means_message(
    node: int, arrays: ArrayRecord, client: int, config_toml: str, label_names: Sequence[str],
    rows: np.ndarray | None = None,
) -> Message:  # fmt: skip
    """Ask one node for its per-class feature sums and counts (``rows`` as for training)."""
    config = ConfigRecord({"client": client, **_task(config_toml, label_names)})
    content = RecordDict({"arrays": arrays, "config": config})
    if rows is not None:
        content["rows"] = ArrayRecord({"rows": Array(np.asarray(rows, dtype=np.int64))})
    return Message(content, dst_node_id=node, message_type=CLASS_MEANS)


def read_class_means_reply(reply: Message) -> tuple[np.ndarray, np.ndarray]:
    """``(sums, counts)`` of a class-means reply (checked by ``fedhello.core.heads``)."""
    record = reply.content.array_records.get("arrays", ArrayRecord())
    if "sums" not in record or "counts" not in record:
        raise ValueError("malformed class-means reply: arrays 'sums' and 'counts' are required")
    arrays = []
    for key in ("sums", "counts"):
        try:
            arrays.append(read_array(record[key]))
        except (TypeError, ValueError) as err:
            raise ValueError(f"malformed class-means reply: array {key!r}: {err}") from err
    return arrays[0], arrays[1]


def class_means_reply(msg: Message, sums: np.ndarray, counts: np.ndarray) -> Message:
    arrays = ArrayRecord({
        "sums": Array(np.ascontiguousarray(sums, dtype=np.float64)),
        "counts": Array(np.ascontiguousarray(counts, dtype=np.int64)),
    })  # fmt: skip
    return Message(RecordDict({"arrays": arrays}), reply_to=msg)


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


def evaluate_reply(msg: Message, scores: Mapping[str, int | float]) -> Message:
    metrics: dict[str, Any] = {k.replace("_", "-"): v for k, v in scores.items()}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
