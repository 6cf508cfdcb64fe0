"""Everything a federation needs, built once from a config: data, shards, model, budgets,
allocation strategy and the initial global adapter. Both engines start from here.

Cheap checks (model source, layer count, budgets) run before the expensive ones (reading and
tokenising data, loading weights), so a bad config fails in a second, not after a minute.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhello.allocation import AllocationStrategy, build_strategy
from fedhello.budgets import client_budgets, client_tiers
from fedhello.config import Config
from fedhello.data import RawData, load_raw
from fedhello.errors import DataError, ModelError
from fedhello.seeds import Purpose, derived_int, generator

logger = logging.getLogger(__name__)


def offline_env(allow_download: bool) -> None:
    """Never wait on a hub that cannot be reached (a failed lookup retries for ~50 s)."""
    if not allow_download:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Experiment:
    cfg: Config
    raw: RawData
    data: Any  # fedhello.encoding.Encoded of every example; None if built without it
    model: Any  # the PEFT model shared by every client
    processor: Any  # tokenizer or image processor (a site's own data is encoded with it)
    task: str
    source: str
    keys: list[str]
    layer_of: dict[str, int | None]
    num_layers: int
    budgets: list[int]
    tiers: list[int]
    shards: list[np.ndarray]  # per client: positions into raw/data
    strategy: AllocationStrategy
    init_state: dict[str, np.ndarray]
    eval_test: np.ndarray  # fixed per-round evaluation subsets
    eval_val: np.ndarray
    proxy: np.ndarray  # the server's labelled proxy set (Fisher scores)


# Loaded and tokenised data, reused by the runs of one process (a comparison runs dozens of
# federations on the same data: reading and tokenising 82k texts each time would cost more
# than a short run). Keyed by everything that shapes the data except how it is partitioned.
PARTITION_FIELDS = {"partition", "dirichlet_alpha", "classes_per_client"}
_DATA_CACHE: dict[str, tuple[RawData, Any]] = {}


def allocation_for(cfg: Config, num_layers: int) -> tuple[list[int], AllocationStrategy]:
    """The clients' layer budgets and the allocation strategy (pure: no torch)."""
    c = cfg.clients
    budgets = client_budgets(c.num_clients, num_layers, c.tiers, c.budgets, c.tier_kind)
    strategy = build_strategy(
        cfg.allocation.strategy, num_layers, budgets, cfg.run.seed, cfg.allocation
    )
    return budgets, strategy


def model_shape(source: str, task: str) -> tuple[str, int]:
    """(task, number of blocks) from the model's config alone, without loading weights."""
    from transformers import AutoConfig

    from fedhello.models import IMAGE_MODEL_TYPES

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelError(f"model {source!r}: cannot read its config: {err}") from None
    if task == "auto":
        task = "image" if config.model_type in IMAGE_MODEL_TYPES else "text"
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int):
        raise ModelError(f"model {source!r}: its config has no num_hidden_layers")
    return task, layers


def prepare_process(cfg: Config) -> None:
    """Offline environment and torch threads, before anything is loaded."""
    import torch

    offline_env(cfg.model.allow_download)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)


def build_lora_classifier(
    cfg: Config, label_names: list[str], task: str, num_layers: int
) -> tuple[Any, Any, list[str], dict[str, int | None]]:
    """The backbone with a head for ``label_names`` and LoRA on its blocks, initialised from
    ``run.seed``: (loaded model and processor, PEFT model, adapter keys, block of each key).
    Shared by the experiment and a site's ClientApp, so that both build the same model."""
    import torch

    from fedhello.lora import adapter_keys, build_lora_model, layer_of_keys
    from fedhello.models import load_model

    torch.manual_seed(derived_int(cfg.run.seed, Purpose.INIT))  # head and LoRA A init
    loaded = load_model(cfg.model.name, label_names, task, cfg.model.allow_download)
    lora = cfg.lora
    model = build_lora_model(loaded.model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    keys = adapter_keys(model)
    return loaded, model, keys, layer_of_keys(keys, num_layers)


def build_experiment(cfg: Config, encode_data: bool = True) -> Experiment:
    """Model, data, partition and strategy of ``cfg``. ``encode_data=False`` skips tokenising
    the whole dataset (most of the build on a large one): a ClientApp, which only trains its
    own shard, encodes that alone (``fedhello.encoding.encode_positions``)."""
    from fedhello.encoding import encode
    from fedhello.lora import get_state
    from fedhello.models import resolve_model_source
    from fedhello.partition import partition_indices

    prepare_process(cfg)
    source = resolve_model_source(cfg.model.name, cfg.model.allow_download)
    task, num_layers = model_shape(source, cfg.model.task)
    budgets, strategy = allocation_for(cfg, num_layers)

    data_key = json.dumps(
        [cfg.data.model_dump(exclude=PARTITION_FIELDS), source, task, cfg.model.max_length]
    )
    cached = _DATA_CACHE.get(data_key)
    raw = cached[0] if cached else load_raw(cfg.data, task, cfg.model.allow_download)
    proxy, train_pool = hold_out_proxy(raw.splits["train"], cfg)
    shards = [
        train_pool[s]
        for s in partition_indices(
            raw.labels[train_pool],
            cfg.clients.num_clients,
            cfg.data.partition,
            cfg.run.seed,
            cfg.data.dirichlet_alpha,
            cfg.data.classes_per_client,
        )
    ]

    loaded, model, keys, layer_of = build_lora_classifier(cfg, raw.label_names, task, num_layers)
    data = cached[1] if cached else None
    if data is None and encode_data:
        data = encode(raw, loaded.processor, cfg.model.max_length)
    if not cached or cached[1] is not data:
        _DATA_CACHE.clear()  # one dataset at a time: bounded memory
        _DATA_CACHE[data_key] = (raw, data)

    def subset(split: str, purpose_key: int) -> np.ndarray:
        idx = raw.splits[split]
        if len(idx) <= cfg.federation.eval_examples:
            return idx
        rng = generator(cfg.data.split_seed, Purpose.EVAL_SUBSET, purpose_key)
        return np.sort(rng.choice(idx, cfg.federation.eval_examples, replace=False))

    logger.info(
        "experiment: %s (%s, %d blocks), %d clients, budgets %s",
        cfg.model.name, task, num_layers, len(budgets), budgets,
    )  # fmt: skip
    return Experiment(
        cfg=cfg,
        raw=raw,
        data=data,
        model=model,
        processor=loaded.processor,
        task=task,
        source=loaded.source,
        keys=keys,
        layer_of=layer_of,
        num_layers=num_layers,
        budgets=budgets,
        tiers=client_tiers(cfg.clients.num_clients, len(cfg.clients.tiers)),
        shards=shards,
        strategy=strategy,
        init_state=get_state(model, keys),
        eval_test=subset("test", 0),
        eval_val=subset("validation", 1),
        proxy=proxy,
    )


def hold_out_proxy(train: np.ndarray, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(proxy, remaining training pool). Held out for every strategy, Fisher-based or not, so
    that all strategies of a comparison see the same client shards."""
    n = cfg.allocation.proxy_examples
    if n > len(train) // 2:
        raise DataError(
            f"allocation.proxy_examples = {n}: the training pool has only {len(train)} examples; "
            f"allowed: at most half of it ({len(train) // 2})"
        )
    perm = generator(cfg.data.split_seed, Purpose.PROXY).permutation(len(train))
    return np.sort(train[perm[:n]]), np.sort(train[perm[n:]])


def sample_clients(seed: int, round_: int, num_clients: int, per_round: int) -> list[int]:
    """The m clients of a round: same for every strategy with the same seed (paired runs)."""
    rng = generator(seed, Purpose.SAMPLE, round_)
    return sorted(rng.choice(num_clients, size=per_round, replace=False).tolist())
