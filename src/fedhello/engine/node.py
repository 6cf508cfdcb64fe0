"""The model a federation's participants build from a config, and nothing of the federation:
the model source and task kind (``model_task``), the backbone with its head and LoRA
(``build_lora_classifier``) and what a Flower node builds to train (``build_node_model``).

Split from ``fedhello.engine.experiment`` (the server's side: data, shards, strategy,
resources) so that the server and a node build their model with one function, and a node's
build imports no partitioning, strategy or resources: a ClientApp's start-up stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel

from fedhello.core.config import Config
from fedhello.core.layers import layer_of_keys
from fedhello.core.seeds import Purpose, derived_int
from fedhello.model.accelerator import Accelerator
from fedhello.model.loading import LoadedModel, load_model
from fedhello.model.lora import adapter_keys, build_lora_model, enable_checkpointing
from fedhello.model.recipe import resolve_recipe
from fedhello.model.source import model_shape, resolve_model_source
from fedhello.tasks import Task, check_config, task_for


def model_task(cfg: Config) -> tuple[str, Task, int]:
    """(model source, task kind, block count) of ``cfg``'s model, from its config alone:
    ``model.task = "auto"`` resolved, and the kind's own checks of ``cfg`` run (the core's
    config knows no kinds: ``fedhello.tasks.check_config``), before anything expensive."""
    source = resolve_model_source(cfg.model.name, cfg.model.allow_download)
    name, num_layers = model_shape(source, cfg.model.task)
    task = task_for(name)
    check_config(cfg, task)
    return source, task, num_layers


def build_lora_classifier(
    cfg: Config, label_names: list[str], task: str, num_layers: int, accelerator: Accelerator
) -> tuple[LoadedModel, PeftModel, list[str], dict[str, int | None]]:
    """The backbone with a head for ``label_names`` and LoRA on its blocks, initialised from
    ``run.seed`` (on the CPU, so every device starts from the same adapter) and placed on
    ``accelerator``: (loaded model and processor, PEFT model, adapter keys, block of each key).
    Shared by the experiment and a node's ClientApp, so that both build the same model."""
    torch.manual_seed(derived_int(cfg.run.seed, Purpose.INIT))  # head and LoRA A init
    m = cfg.model
    loaded = load_model(m.name, label_names, task, m.allow_download, m.pooling)
    lora = cfg.lora
    model = build_lora_model(loaded.model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model)
    keys = adapter_keys(model)
    accelerator.place(model, set(keys))
    return loaded, model, keys, layer_of_keys(keys, num_layers)


@dataclass
class NodeModel:
    """What a ClientApp builds to train and evaluate: the model with its LoRA and head for
    the federation's classes (the server sends their names), and the processor; nothing of
    the federation (no partition, strategy or resources). A site adds its own file, a
    partition node the rows of the configured dataset the server sends: a light node."""

    cfg: Config
    model: PeftModel
    processor: Any
    task: Task
    layer_of: dict[str, int | None]
    label_names: list[str]
    accelerator: Accelerator
    source: str
    num_layers: int


def build_node_model(cfg: Config, label_names: list[str], accelerator: Accelerator) -> NodeModel:
    _, task, num_layers = model_task(cfg)
    loaded, model, _, layer_of = build_lora_classifier(
        cfg, label_names, task.name, num_layers, accelerator
    )
    cfg = resolve_recipe(cfg, task, model)  # a server's config arrives resolved already
    return NodeModel(cfg, model, loaded.processor, task, layer_of, list(label_names), accelerator,
                     loaded.source, num_layers)  # fmt: skip
