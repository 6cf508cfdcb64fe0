"""The embedded engine: a whole federation in one process, deterministic and fast.

The sampled clients train one after the other on one shared model (adapter state swapped in
and out, no deep copies); everything else is the shared core (``fedhello.engine.core``).
"""

from __future__ import annotations

from typing import Any

from fedhello.config import Config
from fedhello.engine.core import RoundPlan, State, run_federation
from fedhello.experiment import Experiment
from fedhello.runs import RunDir
from fedhello.training import ClientResult, train_client


def train_locally(
    exp: Experiment, rp: RoundPlan, state: State, obs: Any
) -> tuple[list[ClientResult], dict[int, str]]:
    results = []
    for alloc in rp.plan.clients:
        if not alloc.layers:  # e.g. `exclusive`: a client whose budget is too small sits out
            continue
        result = train_client(
            exp.model, exp.data, exp.shards[alloc.client], alloc.client, rp.round, alloc.layers,
            state, exp.layer_of, exp.cfg.train, rp.lr, exp.cfg.run.seed,
        )  # fmt: skip
        results.append(result)
        obs.on_client_end(rp.round, result)
    return results, {}


def run_embedded(
    cfg: Config,
    run: RunDir,
    observer: Any = None,
    overwrite: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the whole federation in this process (see ``run_federation``)."""
    return run_federation(cfg, run, train_locally, observer, overwrite, resume, "embedded")
