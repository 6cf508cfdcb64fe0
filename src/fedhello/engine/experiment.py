"""Everything a federation needs, built once from a config: data, shards, model, budgets,
allocation strategy and the initial global adapter. Every engine starts from here; the model
itself is built by ``fedhello.engine.node``, which a Flower node shares (``build_node_model``)
without the federation's data, partition, strategy and resources kept here.

Cheap checks (model source, layer count, budgets) run before the expensive ones (reading and
tokenising data, loading weights), so a bad config fails in a second, not after a minute.
Nothing here changes process-wide state: threads, environment and logging are the caller's.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from peft import PeftModel

from fedhello.core.aggregation import State
from fedhello.core.allocation import AllocationStrategy
from fedhello.core.budgets import client_tiers, strategy_for
from fedhello.core.config import Config
from fedhello.core.layers import AllocationPlan
from fedhello.core.profile import CostProfile
from fedhello.core.seeds import Purpose, generator
from fedhello.data.encoding import ModelInputs, encode
from fedhello.data.loading import RawData, load_raw
from fedhello.data.partition import hold_out_proxy, partition_indices
from fedhello.engine.node import build_lora_classifier, model_task
from fedhello.engine.resources import ModelUnderTest, Resources, setup_resources
from fedhello.model.accelerator import Accelerator, accelerator_for
from fedhello.model.fisher import fisher_scores
from fedhello.model.lora import get_state, set_state
from fedhello.model.recipe import resolve_recipe
from fedhello.tasks import Task

logger = logging.getLogger(__name__)

# What shapes the data but not how it is split across clients (see DataCache).
PARTITION_FIELDS = {"partition", "dirichlet_alpha", "classes_per_client"}


class DataCache:
    """Loaded and tokenised data, reused by the runs that share it.

    A comparison runs dozens of federations on the same data: reading and tokenising 82k
    texts for each would cost more than a short run. The caller owns the cache (``compare``
    makes one per comparison) and it holds one dataset at a time, so memory stays bounded.
    """

    def __init__(self, round_zero_dir: Path | None = None) -> None:
        self._key: str | None = None
        self._value: tuple[RawData, ModelInputs | None] | None = None
        # FedNCM's round 0 of the last run that computed one: its fingerprint and every
        # client's class sums (``fedhello.engine.round_zero.round_zero_key``). A comparison's
        # strategies of one seed share it: same data, shards, model and initial state.
        self.round_zero: tuple[str, list[Any]] | None = None
        # and a folder that keeps them for other processes (``fedhello.engine.round_zero``)
        self.round_zero_dir = round_zero_dir

    @staticmethod
    def key(cfg: Config, source: str, task: str) -> str:
        fields = cfg.data.model_dump(exclude=PARTITION_FIELDS)
        return json.dumps([fields, source, task, cfg.model.max_length], sort_keys=True)

    def get(self, key: str) -> tuple[RawData, ModelInputs | None] | None:
        return self._value if key == self._key else None

    def put(self, key: str, raw: RawData, data: ModelInputs | None) -> None:
        self._key, self._value = key, (raw, data)


@dataclass
class Experiment:
    cfg: Config
    raw: RawData
    data: ModelInputs | None  # every example encoded; None when built with encode_data=False
    model: PeftModel  # the PEFT model shared by every client of this process
    processor: Any  # tokenizer or image processor (a site's own data is encoded with it)
    task: Task
    source: str
    keys: list[str]
    layer_of: dict[str, int | None]
    num_layers: int
    tiers: list[int]
    shards: list[np.ndarray]  # per client: positions into raw/data
    strategy: AllocationStrategy  # owns the clients' budgets
    init_state: State
    eval_test: np.ndarray  # fixed per-round evaluation subsets
    eval_val: np.ndarray
    proxy: np.ndarray  # the server's labelled proxy set (Fisher scores)
    accelerator: Accelerator  # the device and precision everything of this process runs on
    resources: Resources  # the clients' limits, their cost profile and the fit policy
    pooling: str = "head"  # what the head reads: transformers' head, or a pooling (mean, ...)
    # causal-lm: the last generating round and its scored answers, which the summary reuses
    # when that round was the run's last (the same model, prompts and greedy decoding)
    last_generation: tuple[int, dict[str, Any]] | None = None
    cache: DataCache | None = None  # the caller's, when it shares one between runs

    def allocate(self, round_: int, sampled: list[int]) -> AllocationPlan:
        """The strategy's plan of ``round_``, every set checked against its client's limit."""
        return self.resources.fit(self.strategy.allocate(round_, sampled))

    def allocate_everyone(self, round_: int) -> AllocationPlan:
        """What every client would train in ``round_`` if sampled (DP's expected counts)."""
        everyone = range(len(self.strategy.budgets))
        return self.resources.fit_everyone(self.strategy.allocate(round_, everyone))

    @property
    def budgets(self) -> list[int]:
        """Layers each client can afford: the strategy's (the one owner)."""
        return self.strategy.budgets

    @property
    def encoded(self) -> ModelInputs:
        if self.data is None:
            raise RuntimeError("this experiment was built without encoding its data")
        return self.data

    def refresh_fisher(self, round_: int, state: State) -> dict[str, Any]:
        """For strategies that use Fisher scores: score the layers of ``state`` at their
        refresh rounds and hand the scores over; returns what the round's record shows."""
        strategy = self.strategy
        if not strategy.uses_fisher:
            return {}
        info: dict[str, Any] = {}
        if strategy.needs_scores(round_):
            t0 = time.perf_counter()
            set_state(self.model, state)
            scores = fisher_scores(
                self.model, self.encoded, self.proxy, self.layer_of, self.num_layers,
                self.cfg.allocation.fisher_batch_size, self.accelerator,
                factors=strategy.factors,  # FFA-LoRA scores B alone: A never trains
            )  # fmt: skip
            strategy.observe_scores(round_, scores)
            info["fisher_seconds"] = round(time.perf_counter() - t0, 4)
            logger.info("round %d Fisher scores %s", round_, np.round(scores, 6).tolist())
        info["layer_scores"] = strategy.layer_scores()
        info["layer_probabilities"] = strategy.layer_probabilities(round_)
        return info


def split_data(
    cfg: Config, task: Task, raw: RawData | None = None
) -> tuple[RawData, np.ndarray, list[np.ndarray]]:
    """(data, the server's proxy set, each client's shard): ``raw`` (read when not given)
    split as ``cfg`` says; the data's errors (columns, labels, sizes) surface here."""
    if raw is None:
        raw = load_raw(cfg.data, task, cfg.model.allow_download)
    proxy, train_pool = hold_out_proxy(
        raw.splits["train"], cfg.allocation.proxy_examples, cfg.data.split_seed
    )
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
    return raw, proxy, shards


def check_data(cfg: Config, cache: DataCache) -> None:
    """Read and split the data of ``cfg`` now, keeping it in ``cache`` for the build that
    follows: an engine that starts other machinery first (Ray) fails on bad data before it."""
    source, task, _ = model_task(cfg)
    key = DataCache.key(cfg, source, task.name)
    cached = cache.get(key)
    raw, _, _ = split_data(cfg, task, cached[0] if cached else None)
    if cached is None:
        cache.put(key, raw, None)


def build_experiment(
    cfg: Config,
    encode_data: bool = True,
    cache: DataCache | None = None,
    accelerator: Accelerator | None = None,
    saved_profile: CostProfile | None = None,
) -> Experiment:
    """Model, data, partition and strategy of ``cfg`` (the server's side; a Flower node builds
    only a ``NodeModel``). ``encode_data=False`` skips tokenising the whole dataset (most of
    the build on a large one). ``cache`` reuses the data of an earlier build with the same
    data settings. ``accelerator``: the device and precision (default: resolved from ``cfg``, first,
    so a missing GPU fails before loading). ``saved_profile``: the cost profile a resumed run
    used (else stored or measured)."""
    accelerator = accelerator or accelerator_for(cfg)
    source, task, num_layers = model_task(cfg)
    strategy = strategy_for(cfg, num_layers)
    warmup = getattr(strategy.options, "fisher_warmup", None)
    if strategy.uses_fisher and warmup is not None and cfg.federation.rounds <= warmup:
        logger.warning(
            "%s never scores its layers: federation.rounds = %d <= allocation.fisher_warmup "
            "= %d, so every round draws from the prior shape (RGD-HLA)",
            cfg.allocation.strategy, cfg.federation.rounds, warmup,
        )  # fmt: skip
    key = DataCache.key(cfg, source, task.name)
    cached = cache.get(key) if cache is not None else None
    raw, proxy, shards = split_data(cfg, task, cached[0] if cached else None)

    loaded, model, keys, layer_of = build_lora_classifier(
        cfg, raw.label_names, task.name, num_layers, accelerator
    )
    cfg = resolve_recipe(cfg, task, model)
    data = cached[1] if cached else None
    if data is None and encode_data:
        data = encode(raw, loaded.processor, cfg.model.max_length, cfg.data.augment)
    if cache is not None:
        cache.put(key, raw, data)

    def subset(split: str, purpose_key: int) -> np.ndarray:
        idx = raw.splits[split]
        if len(idx) <= cfg.federation.eval_examples:
            return idx
        rng = generator(cfg.data.split_seed, Purpose.EVAL_SUBSET, purpose_key)
        return np.sort(rng.choice(idx, cfg.federation.eval_examples, replace=False))

    init_state = get_state(model, keys)
    under_test = ModelUnderTest(model, layer_of, num_layers, task, len(raw.label_names),
                                loaded.source, accelerator)  # fmt: skip
    res = setup_resources(cfg, strategy, under_test, init_state, saved_profile)
    logger.info(
        "experiment: %s (%s, %d blocks), %d clients, budgets %s (floors %s); %s",
        cfg.model.name, task.name, num_layers, len(strategy.budgets), strategy.budgets,
        strategy.floors, accelerator.reason,
    )  # fmt: skip
    return Experiment(
        cfg=cfg,
        raw=raw,
        data=data,
        model=model,
        processor=loaded.processor,
        task=task,
        source=loaded.source,
        pooling=loaded.pooling,
        keys=keys,
        layer_of=layer_of,
        num_layers=num_layers,
        tiers=client_tiers(cfg.clients.num_clients, len(cfg.clients.tiers), cfg.clients.budgets),
        shards=shards,
        strategy=strategy,
        init_state=init_state,
        eval_test=subset("test", 0),
        eval_val=subset("validation", 1),
        proxy=proxy,
        accelerator=accelerator,
        resources=res,
        cache=cache,
    )
