"""The embedded engine: a whole federation in one process, deterministic and fast.

The sampled clients train one after the other on one shared model (adapter state swapped in
and out, no deep copies); everything else is the shared core (``fedhello.engine.core``).
(Called "embedded" rather than "simulation" so that it is not confused with Flower's
simulation engine, which ``--engine flower-sim`` runs.)
"""

from __future__ import annotations

import logging
from typing import Any

from fedhello.core.aggregation import State
from fedhello.core.config import Config
from fedhello.core.heads import ClassSums
from fedhello.engine.core import Observer, RunOptions, run_federation
from fedhello.engine.experiment import Experiment
from fedhello.engine.round_zero import RoundZeroStore, round_zero_key
from fedhello.engine.rounds import RoundPlan, RoundResults
from fedhello.model.class_means import class_feature_sums, linear_head
from fedhello.model.step import LossScale
from fedhello.model.training import LocalTask, Shard, train_client
from fedhello.store.runs import RunDir

logger = logging.getLogger(__name__)


class EmbeddedEngine:
    """Trains every sampled client in this process, in client order. Under fp16 the clients
    share one loss scale for the whole run (``LossScale``: this process's training owns it);
    a resumed run starts it afresh."""

    name = "embedded"

    def __init__(self) -> None:
        self.loss_scale = LossScale()

    def start(self, exp: Experiment) -> None:
        del exp  # nothing to discover: every client is here
        self.loss_scale = LossScale()

    def train_round(
        self, exp: Experiment, rp: RoundPlan, state: State, observer: Observer
    ) -> RoundResults:
        results = []
        for alloc in rp.plan.clients:
            if not alloc.layers:  # e.g. `exclusive`: a client whose budget is too small sits out
                continue
            task = LocalTask.of(exp.cfg, alloc.client, rp.round, alloc.spec, rp.lr, rp.clip_norm)
            shard = Shard(exp.encoded, exp.shards[alloc.client])
            result = train_client(
                exp.model, exp.layer_of, shard, task, state, exp.cfg.train, exp.accelerator,
                self.loss_scale,
            )  # fmt: skip
            results.append(result)
            observer.on_client_end(rp.round, result)
        return RoundResults(results)

    def final_scores(self, exp: Experiment, state: State) -> dict[str, Any]:
        return {}

    def class_sums(self, exp: Experiment, state: State) -> tuple[list[ClassSums], dict[int, str]]:
        """Every client's class sums, in client order (FedNCM's round 0). With a cache shared
        between runs (a comparison's), the sums of an earlier run with the same fingerprint
        (``round_zero_key``: its strategies of one seed) are reused, and with a cache folder
        (``--cache-dir``) those of an earlier process: they are bit-identical, and round 0
        costs about as much as a comparison's 10 rounds of training."""
        cache = exp.cache
        key = round_zero_key(exp, state) if cache is not None else None
        if cache is not None and cache.round_zero is not None and cache.round_zero[0] == key:
            logger.info("round 0: the class sums of an earlier run with the same data, model, "
                        "seed and initial state, reused")  # fmt: skip
            return list(cache.round_zero[1]), {}
        store = RoundZeroStore(cache.round_zero_dir) if cache and cache.round_zero_dir else None
        kept = None
        if store is not None and key is not None:
            linear = linear_head(exp.model)[1]
            shape = (linear.out_features, linear.in_features)
            kept = store.load(key, len(exp.shards), shape)
        if kept is not None and store is not None and key is not None:
            logger.info("round 0: the class sums kept in %s, reused", store.path(key))
            out = kept
        else:
            cfg, out = exp.cfg, []
            for client, rows in enumerate(exp.shards):
                sums, counts = class_feature_sums(
                    exp.model, Shard(exp.encoded, rows), state, cfg.train.eval_batch_size,
                    exp.accelerator, seed=cfg.run.seed, client=client,
                )  # fmt: skip
                out.append(ClassSums(client, sums, counts))
            if store is not None and key is not None:
                store.save(key, out)
        if cache is not None and key is not None:
            cache.round_zero = (key, out)
        return out, {}


def run_embedded(cfg: Config, run: RunDir, options: RunOptions | None = None) -> dict[str, Any]:
    """Run the whole federation in this process (see ``run_federation``)."""
    return run_federation(cfg, run, EmbeddedEngine(), options)
