"""The embedded engine: a whole federation in one process, deterministic and fast.

The sampled clients train one after the other on one shared model (adapter state swapped in
and out, no deep copies); everything else is the shared core (``fedhello.engine.core``).
(Called "embedded" rather than "simulation" so that it is not confused with Flower's
simulation engine, which ``--engine flower-sim`` runs.)
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import torch

from fedhello.core.aggregation import State
from fedhello.core.config import Config
from fedhello.core.heads import ClassSums
from fedhello.engine.core import Observer, RunOptions, run_federation
from fedhello.engine.experiment import DataCache, Experiment
from fedhello.engine.rounds import RoundPlan, RoundResults
from fedhello.model.class_means import class_feature_sums
from fedhello.model.step import LossScale
from fedhello.model.training import LocalTask, Shard, train_client
from fedhello.store.runs import RunDir

logger = logging.getLogger(__name__)


def round_zero_key(exp: Experiment, state: State) -> str:
    """A fingerprint of everything FedNCM's round 0 computes from: the data and its encoding,
    the model and how it is read (source, pooling, device, precision, deterministic kernels,
    this process's thread count, which the CPU's arithmetic depends on), the batches (batch
    size, the seed that picks a large shard's subset, every shard's rows) and the state the
    features are computed under. Equal fingerprints compute bit-identical class sums."""
    cfg = exp.cfg
    acc = exp.accelerator
    h = hashlib.sha256()
    parts = [
        DataCache.key(cfg, exp.source, exp.task.name), exp.pooling, str(acc.device),
        acc.precision, acc.base_precision, cfg.train.deterministic, cfg.train.eval_batch_size,
        cfg.run.seed, torch.get_num_threads(),
    ]  # fmt: skip
    h.update(json.dumps(parts, sort_keys=True).encode())
    for rows in exp.shards:
        h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes() + b"|")
    for key in sorted(state):
        value = np.ascontiguousarray(state[key])
        h.update(f"{key}:{value.dtype}:{value.shape}".encode() + value.tobytes())
    return h.hexdigest()


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
        (``round_zero_key``: its strategies of one seed) are reused: they are bit-identical,
        and round 0 is a quarter of a skew study's run."""
        cache = exp.cache
        key = round_zero_key(exp, state) if cache is not None else None
        if cache is not None and cache.round_zero is not None and cache.round_zero[0] == key:
            logger.info("round 0: the class sums of an earlier run with the same data, model, "
                        "seed and initial state, reused")  # fmt: skip
            return list(cache.round_zero[1]), {}
        cfg, out = exp.cfg, []
        for client, rows in enumerate(exp.shards):
            sums, counts = class_feature_sums(
                exp.model, Shard(exp.encoded, rows), state, cfg.train.eval_batch_size,
                exp.accelerator, seed=cfg.run.seed, client=client,
            )  # fmt: skip
            out.append(ClassSums(client, sums, counts))
        if cache is not None and key is not None:
            cache.round_zero = (key, out)
        return out, {}


def run_embedded(cfg: Config, run: RunDir, options: RunOptions | None = None) -> dict[str, Any]:
    """Run the whole federation in this process (see ``run_federation``)."""
    return run_federation(cfg, run, EmbeddedEngine(), options)
