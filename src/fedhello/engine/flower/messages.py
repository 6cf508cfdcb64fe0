"""The wire format between the fedhello ServerApp and ClientApp, and the server's half of it:
requests built, replies read. The node's half (requests read, replies built, what a node may
declare) is ``node_messages``; a client's report, both ways, is ``report_wire``. Every Flower
message and key is built and read in these three modules, and nowhere else; the contract
below is the one both halves follow.

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
  from the config, as the embedded engine does, and trains exactly the spec sent: at
  ``train-rank``, never at a rank of its own (a HetLoRA client's rank after it pruned is the
  server's to hand back, recorded from accepted updates only). Reply ``arrays`` = exactly the
  tensors of that spec (``fedhello.core.layers.keys_for_spec``), at ``train-rank`` or lower
  (HetLoRA's client prunes in the round it trains), and the client's report
  (``fedhello.model.report.REPORT``, one key per field the client measures, its name in
  kebab-case): numbers in ``metrics`` = ``num-examples`` (int), ``train-loss``,
  ``seconds``, ``step-seconds``, ``cpu-seconds``, ``peak-memory-mb``, ``train-memory-mb``
  (floats), ``trainable-params``, ``steps``, ``examples-seen`` (ints), on an accelerator
  ``device-peak-memory-mb`` (CUDA's allocator peak; MPS's largest sampled allocation) and,
  in fp16 only, ``skipped-steps`` (int: overflowed steps the loss scaler did not apply);
  strings in ``config`` = ``device``, ``precision`` (what this node trained on, recorded per
  client). Every field but ``device-peak-memory-mb``, ``skipped-steps`` and ``cpu-seconds``
  is required: a reply missing one, or carrying it with the wrong type, is rejected with a
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

from collections.abc import Sequence
from typing import Any

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

from fedhello.core.layers import AdapterSpec
from fedhello.engine.flower.arrays import read_array, read_arrays
from fedhello.engine.flower.report_wire import decode_report
from fedhello.model.lora import state_nbytes
from fedhello.model.report import ClientResult


def _task(config_toml: str, label_names: Sequence[str]) -> dict[str, Any]:
    return {"fedhello-config": config_toml, "label-names": list(label_names)}


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
