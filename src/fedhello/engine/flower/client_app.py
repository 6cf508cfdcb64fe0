"""The fedhello ClientApp: trains the allocated layers of its data with the shared code.

A node declares in ``--node-config`` its ``partition-id`` (set automatically in Flower's
simulation) and may declare a budget: ``budget-layers`` (a count), ``budget-tier`` (a tier of
``clients.tiers``), limits in real units (``budget-memory-mb``, ``budget-step-seconds``,
``budget-upload-mb``: the node measures its own cost profile for the first two and sends it
with its query reply, so the server checks every set it allocates against what this device
costs). The retired ``budget-cost`` / ``budget-memory`` are refused by the server with the
limit that replaces each.
Its data is its partition of the configured dataset, or, if the node config names one
(``data="/srv/site.csv"``), its own file, which never leaves the node
(``fedhello.data.site``); such a site may leave out ``partition-id`` and take the client id
the server assigns (``discovery``). The messages are ``fedhello.engine.flower.messages``'
(this module reads and answers them with ``node_messages``).

The config arrives with every message; the model it describes is built once per process and
kept in ``node_data``'s cache (in Flower's simulation a Ray actor serves many messages; in a
deployment each message starts a fresh process). A node is light: it builds the model, the
task and its own shard, nothing of the federation. A partition node is sent the positions of
its rows with each train message (the server split the data once), reads the configured
dataset to find them, and tokenises only those; it never partitions the whole dataset.

A node trains exactly the spec the server sends: it keeps no rank (or other allocation) of its
own between rounds, so that it trains what the embedded engine's client would, also after the
server rejected its update (HetLoRA's pruned rank is the server's record, from accepted
updates only, and checkpointed with its state). Its ``context.state`` holds only fp16's loss
scale between rounds (``LOSS_SCALE_STATE``).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedhello.core.config import Config, build_config
from fedhello.core.errors import UserError
from fedhello.core.profile import CostProfile
from fedhello.data.encoding import ModelInputs
from fedhello.engine.flower import node_data
from fedhello.engine.flower import node_messages as wire
from fedhello.engine.flower.simulation import actor_device
from fedhello.engine.node import NodeModel, build_node_model
from fedhello.engine.resources import ModelUnderTest, obtain_profile
from fedhello.model.accelerator import Accelerator, resolve
from fedhello.model.class_means import class_feature_sums
from fedhello.model.determinism import configure_process
from fedhello.model.lora import set_state
from fedhello.model.step import LossScale
from fedhello.model.training import LocalTask, Shard, train_client

app = ClientApp()


def _config(config_toml: str) -> Config:
    cfg = build_config(tomllib.loads(config_toml))
    if cfg.run.threads:  # this process is the node's: its thread count is the run's to set
        torch.set_num_threads(cfg.run.threads)
    configure_process(cfg.train.deterministic)  # and so is its deterministic mode (once)
    return cfg


def node_accelerator(cfg: Config, node_config: Any) -> Accelerator:
    """This node's device and precision: what its ``--node-config`` declares (``device``,
    ``precision``, ``base-precision``: a site with a small GPU in fp16, another on its CPU),
    else the run's settings, resolved on this node's hardware. In Flower's simulation the
    node is a Ray actor that sees only the GPU Ray gave it: a ``cuda:N`` means that one."""
    t = cfg.train
    run_values = (t.device, t.precision, t.base_precision)  # in NODE_DEVICE_KEYS' order
    device, precision, base = (
        str(node_config.get(key, value))
        for key, value in zip(wire.NODE_DEVICE_KEYS, run_values, strict=True)
    )
    return resolve(actor_device(device), precision, base)


def _node_key(node_config: Any) -> list[str]:
    """What of a node's config changes the model it builds (its device and precisions)."""
    return [str(node_config.get(k, "")) for k in wire.NODE_DEVICE_KEYS]


def node_model_for(config_toml: str, label_names: list[str], node_config: Any) -> NodeModel:
    """This node's model for the federation's classes (sent by the server), on its device."""
    key = [config_toml, label_names, _node_key(node_config)]
    digest = hashlib.sha256(json.dumps(key).encode())

    def build() -> NodeModel:
        cfg = _config(config_toml)
        return build_node_model(cfg, label_names, node_accelerator(cfg, node_config))

    return node_data.CACHE.get(digest.hexdigest(), build)


def _site(req: wire.Request, node_config: Any) -> tuple[NodeModel, ModelInputs, dict[str, Any]]:
    if req.config_toml is None:
        raise ValueError("the message carries no fedhello-config")
    site = node_model_for(req.config_toml, req.label_names, node_config)
    data, splits = node_data.site_data_for(site, str(node_config["data"]))
    return site, data, splits


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Declare partition id, budget and data file; with the run's config, also check that file
    (so that a bad site file stops the run at the start with its reason, not mid-round)."""
    nc = context.node_config
    info = wire.declared(nc)
    if "config-error" in info:  # a value of the wrong type: nothing else is worth checking
        return wire.query_reply(msg, info)
    req = wire.read_request(msg)
    if req.config_toml is not None:
        try:
            accelerator = node_accelerator(_config(req.config_toml), nc)
            info |= {"device": str(accelerator.device), "precision": accelerator.precision}
        except UserError as err:
            own = any(k in nc for k in wire.NODE_DEVICE_KEYS)
            source = "its --node-config" if own else "the run's train settings, on this node"
            info["device-error"] = f"{err} (from {source})"
            return wire.query_reply(msg, info)
    if "data" in nc and req.config_toml is not None:
        try:
            _, _, splits = _site(req, nc)
            info["site-examples"] = len(splits["train"])
            info["site-validation"] = len(splits["validation"])
        except UserError as err:
            info["data-error"] = str(err)
            return wire.query_reply(msg, info)
    if any(k in nc for k in wire.MEASURED_LIMITS) and req.config_toml is not None:
        try:
            info["cost-profile"] = json.dumps(node_profile(req, nc).to_json())
        except (UserError, RuntimeError) as err:  # e.g. out of memory on the node's device
            info["profile-error"] = f"measuring its cost profile failed: {err}"
    return wire.query_reply(msg, info)


def node_profile(req: wire.Request, nc: Any) -> CostProfile:
    """This node's cost profile, on its own device and precision: stored on the node
    (``profile-dir`` in its node config, else the run's ``run.profile_dir``) or measured."""
    assert req.config_toml is not None
    learner = (
        _site(req, nc)[0] if "data" in nc else node_model_for(req.config_toml, req.label_names, nc)
    )
    labels, source = len(learner.label_names), learner.source
    cfg = learner.cfg
    if "profile-dir" in nc:
        run = cfg.run.model_copy(update={"profile_dir": str(nc["profile-dir"])})
        cfg = cfg.model_copy(update={"run": run})
    m = ModelUnderTest(learner.model, learner.layer_of, learner.num_layers, learner.task, labels,
                       source, learner.accelerator)  # fmt: skip
    return obtain_profile(cfg, m)[0]


def _learner(req: wire.Request, nc: Any, client: int) -> tuple[NodeModel, Shard]:
    """This node's model and the shard it trains on (its own file's, or the rows sent)."""
    if "partition-id" in nc and int(nc["partition-id"]) != client:
        raise ValueError(f"message for client {client} reached partition {nc['partition-id']}")
    if "data" in nc:
        learner, data, splits = _site(req, nc)
        return learner, Shard(data, splits["train"])
    if "partition-id" in nc and req.config_toml is not None:
        if req.rows is None:
            raise ValueError("a message for a partition node must carry its rows")
        learner = node_model_for(req.config_toml, req.label_names, nc)
        return learner, node_data.partition_shard(learner, client, req.rows)
    raise ValueError("this node declares neither partition-id nor data in its node config")


@app.train()
def train(msg: Message, context: Context) -> Message:
    req = wire.read_request(msg)
    nc = context.node_config
    client = req.client  # the server's id for this node (declared or assigned)
    if client is None or req.round is None or req.lr is None or req.state is None:
        raise ValueError("a train message needs client, server-round, lr and arrays")
    learner, shard = _learner(req, nc, client)
    cfg = learner.cfg
    # the server's spec as sent, its rank included: HetLoRA's pruned rank is the server's to
    # hand back (from accepted updates only), never a rank this node keeps for itself
    task = LocalTask.of(cfg, client, req.round, req.spec, req.lr, req.clip_norm)
    # fp16's loss scale, as this node's previous round left it (``LossScale``)
    loss_scale = LossScale.from_record(context.state.config_records.get(LOSS_SCALE_STATE))
    result = train_client(
        learner.model, learner.layer_of, shard, task, req.state, cfg.train, learner.accelerator,
        loss_scale,
    )  # fmt: skip
    if loss_scale.scale is not None:
        context.state[LOSS_SCALE_STATE] = ConfigRecord(loss_scale.to_record())
    return wire.train_reply(msg, result)


@app.query("class_means")
def class_means(msg: Message, context: Context) -> Message:
    """FedNCM's round 0: per class, the sum of the head's input features over this node's
    shard and their count (``fedhello.model.class_means``); only these leave the node."""
    req = wire.read_request(msg)
    if req.client is None or req.state is None:
        raise ValueError("a class-means message needs client and arrays")
    learner, shard = _learner(req, context.node_config, req.client)
    cfg = learner.cfg
    sums, counts = class_feature_sums(
        learner.model, shard, req.state, cfg.train.eval_batch_size, learner.accelerator,
        seed=cfg.run.seed, client=req.client,
    )  # fmt: skip
    return wire.class_means_reply(msg, sums, counts)


LOSS_SCALE_STATE = "fedhello-loss-scale"  # fp16's loss scale, kept between a node's rounds


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model on the held-out rows of the node's own file; only scores leave."""
    nc = context.node_config
    if "data" not in nc:
        raise ValueError("only a node with its own data file evaluates (the server holds the rest)")
    from fedhello.model.evaluation import evaluate as evaluate_rows  # sklearn: not for training

    req = wire.read_request(msg)
    site, data, splits = _site(req, nc)
    scores: dict[str, int | float] = {"num_examples": len(splits["validation"])}
    if len(splits["validation"]) and req.state is not None:
        set_state(site.model, req.state)
        batch = site.cfg.train.eval_batch_size
        if site.task.generative:  # a language model: its answers' loss and perplexity
            from fedhello.model.generation import response_loss

            lm = response_loss(site.model, data, splits["validation"], batch, site.accelerator)  # type: ignore[arg-type]
            scores |= {k: lm[k] for k in ("loss", "perplexity")}
        else:
            result = evaluate_rows(
                site.model, data, splits["validation"], batch, site.accelerator, site.task
            )
            scores |= {k: result[k] for k in ("accuracy", "macro_f1", "loss")}
    return wire.evaluate_reply(msg, scores)
