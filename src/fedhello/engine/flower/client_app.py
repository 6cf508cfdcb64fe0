"""The fedhello ClientApp: trains the allocated layers of its data with the shared code.

A node declares in ``--node-config`` its ``partition-id`` (set automatically in Flower's
simulation) and may declare a budget: ``budget-layers`` (a count), ``budget-tier`` (a tier of
``clients.tiers``), ``budget-cost`` or ``budget-memory`` (a fraction of the step time or
activation memory of training every layer, turned into layers by ``fedhello.costmodel``).
Its data is its partition of the configured dataset, or, if the node config names one
(``data="/srv/site.csv"``), its own file, which never leaves the node
(``fedhello.site_data``); such a site may leave out ``partition-id`` and take the client id
the server assigns (``discovery``).

The config arrives with every message; the experiment it describes is built once per process
and reused. Only the examples this node trains on are tokenised: in a deployment every
message starts a fresh process, and tokenising the whole dataset was most of its start-up.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedhello.config import build_config
from fedhello.encoding import Encoded, encode, encode_positions
from fedhello.engine.flower.records import from_record, result_to_reply
from fedhello.errors import UserError
from fedhello.experiment import Experiment, build_experiment
from fedhello.lora import set_state
from fedhello.site_data import SiteModel, build_site_model, load_site_raw
from fedhello.training import train_client

app = ClientApp()
# One model per process (bounded memory): the experiment of a partition node, or the model
# of a site; and the node's encoded examples with their splits, keyed by (partition, file).
_MODELS: dict[str, Any] = {}
_ENCODED: dict[tuple[int, str], tuple[Encoded, dict[str, np.ndarray]]] = {}


def _cached(key: str, build: Any) -> Any:
    if key not in _MODELS:
        _MODELS.clear()
        _ENCODED.clear()
        _MODELS[key] = build()
    return _MODELS[key]


def _config(config_toml: str) -> Any:
    return build_config(tomllib.loads(config_toml))


def experiment_for(config_toml: str) -> Experiment:
    """A partition node's experiment: model, and the configured dataset to find its shard."""
    key = "exp:" + hashlib.sha256(config_toml.encode()).hexdigest()
    return _cached(key, lambda: build_experiment(_config(config_toml), encode_data=False))


def site_model_for(config_toml: str, label_names: list[str]) -> SiteModel:
    """A site's model for the federation's classes; the configured dataset is not read."""
    blob = json.dumps([config_toml, label_names]).encode()
    key = "site:" + hashlib.sha256(blob).hexdigest()
    return _cached(key, lambda: build_site_model(_config(config_toml), label_names))


def site_data_for(site: SiteModel, path: str) -> tuple[Encoded, dict[str, np.ndarray]]:
    """The node's own file and its train / validation rows, read and encoded once."""
    key = (-1, path)
    if key not in _ENCODED:
        raw = load_site_raw(path, site.cfg.data, site.task, site.label_names)
        _ENCODED[key] = encode(raw, site.processor, site.cfg.model.max_length), raw.splits
    return _ENCODED[key]


def partition_data(exp: Experiment, pid: int) -> tuple[Encoded, np.ndarray]:
    """A partition node's shard alone, encoded (row i is shard position i, so batches are the
    embedded engine's), and the rows to train on (all of them)."""
    if (pid, "") not in _ENCODED:
        encoded = encode_positions(
            exp.raw, exp.shards[pid], exp.processor, exp.cfg.model.max_length
        )
        _ENCODED[pid, ""] = encoded, {"train": np.arange(len(encoded))}
    data, splits = _ENCODED[pid, ""]
    return data, splits["train"]


def _site(config: Any, node_config: Any) -> tuple[SiteModel, Encoded, dict[str, np.ndarray]]:
    site = site_model_for(str(config["fedhello-config"]), [str(x) for x in config["label-names"]])
    data, splits = site_data_for(site, str(node_config["data"]))
    return site, data, splits


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Declare partition id, budget and data file; with the run's config, also check that file
    (so that a bad site file stops the run at the start with its reason, not mid-round)."""
    nc = context.node_config
    info: dict[str, int | float | str] = {}
    for key in ("partition-id", "budget-layers", "budget-tier"):
        if key in nc:
            info[key] = int(nc[key])
    for key in ("budget-cost", "budget-memory"):
        if key in nc:
            info[key] = float(nc[key])
    request = msg.content.config_records.get("config", ConfigRecord())
    if "data" in nc:
        info["data"] = str(nc["data"])  # the server orders sites without partition-id by it
        if "fedhello-config" in request:
            try:
                _, _, splits = _site(request, nc)
                info["site-examples"] = len(splits["train"])
                info["site-validation"] = len(splits["validation"])
            except UserError as err:
                info["data-error"] = str(err)
    return Message(RecordDict({"config": ConfigRecord(info)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    client = int(config["client"])  # the server's id for this node (declared or assigned)
    nc = context.node_config
    if "partition-id" in nc and int(nc["partition-id"]) != client:
        raise ValueError(f"message for client {client} reached partition {nc['partition-id']}")
    if "data" in nc:
        learner, data, splits = _site(config, nc)
        rows = splits["train"]
    elif "partition-id" in nc:
        learner = experiment_for(str(config["fedhello-config"]))
        data, rows = partition_data(learner, client)
    else:
        raise ValueError("this node declares neither partition-id nor data in its node config")
    state = from_record(msg.content.array_records["arrays"])
    layers = tuple(int(x) for x in config["train-layers"])  # type: ignore[union-attr]
    cfg = learner.cfg
    result = train_client(
        learner.model, data, rows, client, int(config["server-round"]), layers, state,
        learner.layer_of, cfg.train, float(config["lr"]), cfg.run.seed,
    )  # fmt: skip
    arrays, metrics = result_to_reply(result)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model on the held-out rows of the node's own file; only scores leave."""
    from fedhello.evaluation import evaluate as evaluate_rows  # sklearn: not for train messages

    config = msg.content.config_records["config"]
    nc = context.node_config
    if "data" not in nc:
        raise ValueError("only a node with its own data file evaluates (the server holds the rest)")
    site, data, splits = _site(config, nc)
    metrics: dict[str, int | float] = {"num-examples": len(splits["validation"])}
    if len(splits["validation"]):
        set_state(site.model, from_record(msg.content.array_records["arrays"]))
        batch = site.cfg.train.eval_batch_size
        scores = evaluate_rows(site.model, data, splits["validation"], batch)
        metrics |= {"accuracy": scores["accuracy"], "macro-f1": scores["macro_f1"],
                    "loss": scores["loss"]}  # fmt: skip
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
