"""The fedhello ClientApp: trains the allocated layers of its partition with the shared code.

A node knows its ``partition-id`` (and may declare ``budget-layers``) from ``--node-config``
(set automatically in Flower's simulation). The config arrives with every train message; the
experiment it describes (model, data shard) is built once per process and reused.
"""

from __future__ import annotations

import hashlib
import tomllib

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedhello.config import build_config
from fedhello.engine.flower.records import from_record, result_to_reply
from fedhello.experiment import Experiment, build_experiment
from fedhello.training import train_client

app = ClientApp()
_EXPERIMENTS: dict[str, Experiment] = {}


def experiment_for(config_toml: str) -> Experiment:
    key = hashlib.sha256(config_toml.encode()).hexdigest()
    if key not in _EXPERIMENTS:
        _EXPERIMENTS.clear()  # one experiment per process: bounded memory
        _EXPERIMENTS[key] = build_experiment(build_config(tomllib.loads(config_toml)))
    return _EXPERIMENTS[key]


@app.query()
def query(msg: Message, context: Context) -> Message:
    info: dict[str, int] = {"partition-id": int(context.node_config["partition-id"])}
    for key in ("budget-layers", "budget-tier"):
        if key in context.node_config:
            info[key] = int(context.node_config[key])
    return Message(RecordDict({"config": ConfigRecord(info)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    exp = experiment_for(str(config["fedhello-config"]))
    pid = int(context.node_config["partition-id"])
    if pid != int(config["client"]):
        raise ValueError(f"message for client {config['client']} reached partition {pid}")
    state = from_record(msg.content.array_records["arrays"])
    layers = tuple(int(x) for x in config["train-layers"])  # type: ignore[union-attr]
    result = train_client(
        exp.model, exp.data, exp.shards[pid], pid, int(config["server-round"]), layers, state,
        exp.layer_of, exp.cfg.train, float(config["lr"]), exp.cfg.run.seed,
    )  # fmt: skip
    arrays, metrics = result_to_reply(result)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)
