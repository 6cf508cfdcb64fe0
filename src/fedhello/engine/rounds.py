"""A round of the federation, as every engine shares it: open it (sample, refresh Fisher
scores, allocate, set the learning rate and the head's mode), and close it (check the uploads,
aggregate per layer, with client-level DP where configured, move the global state by the
server optimizer, evaluate, and build the round's record). The run loop that calls them is
``fedhello.engine.core``; an engine only trains the clients in between.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedhello.core.aggregation import State, flag_misreported_work
from fedhello.core.heads import head_mode
from fedhello.core.layers import AllocationPlan
from fedhello.core.privacy.server import PrivateAggregator
from fedhello.core.schedule import lr_at, sample_clients
from fedhello.core.server_optimizers import ServerOptimizer
from fedhello.engine import privacy
from fedhello.engine.experiment import Experiment
from fedhello.engine.records import client_record, evaluate_global, repairs_field
from fedhello.model.report import ClientResult

logger = logging.getLogger(__name__)


@dataclass
class RoundPlan:
    """What the server decided at the start of a round."""

    round: int
    sampled: list[int]
    plan: AllocationPlan
    lr: float
    fisher_info: dict[str, Any]
    started: float
    head: str = "federated"  # what the clients do with the head (``train.head``'s this round)
    class_means: dict[str, Any] | None = None  # FedNCM's round 0, recorded with round 1
    clip_norm: float | None = None  # client-level DP: the norm each update is clipped to
    # client-level DP: the round's allocation of every client, whose expected counts divide
    # the noisy sums (``fedhello.core.privacy.server.expected_counts``)
    population: AllocationPlan | None = None


@dataclass
class RoundResults:
    """What came back from a round's clients: their results, and who failed and why."""

    results: list[ClientResult]
    failed: dict[int, str] = field(default_factory=dict)


def open_round(
    exp: Experiment, round_: int, state: State, class_means: dict[str, Any] | None = None,
    private: PrivateAggregator | None = None,
) -> RoundPlan:  # fmt: skip
    """Sample, refresh Fisher scores, allocate, and set the round's learning rate and what the
    clients do with the head (``train.head``, ``fedhello.core.heads.head_mode``);
    ``class_means``: FedNCM's round 0, for round 1's record; ``private``: DP's server, whose
    key samples the clients (``privacy.noise = "secret"``) and whose clip norm is the round's."""
    cfg = exp.cfg
    t0 = time.perf_counter()
    seed = cfg.run.seed if private is None else private.sampling_seed
    sampled = sample_clients(seed, round_, cfg.clients.num_clients, cfg.clients.per_round)
    fisher_info = exp.refresh_fisher(round_, state)
    plan = exp.allocate(round_, sampled)
    t = cfg.train
    lr = lr_at(round_, cfg.federation.rounds, t.lr, t.lr_schedule, t.lr_min_factor, t.lr_decay)
    rounds = cfg.federation.rounds
    head = head_mode(t.head, round_, rounds, t.finetune_rounds(rounds))

    def with_head(p: AllocationPlan) -> AllocationPlan:
        if head == "federated":
            return p
        return replace(p, clients=tuple(replace(a, head=head) for a in p.clients))

    plan = with_head(plan)
    # under DP, what every client would train this round: the noisy means' public denominators
    population = None if private is None else with_head(exp.allocate_everyone(round_))
    clip_norm = None if private is None else private.clip_norm
    return RoundPlan(
        round_, sampled, plan, lr, fisher_info, t0, head, class_means, clip_norm, population
    )


def head_field(exp: Experiment, rp: RoundPlan) -> dict[str, Any]:
    """``head``, the clients' head mode this round (absent with the default ``train.head``),
    and in round 1 of ``class-means`` what round 0 built (``class_means``)."""
    if exp.cfg.train.head == "federated":
        return {}
    return {"head": rp.head, **({"class_means": rp.class_means} if rp.class_means else {})}


def close_round(
    exp: Experiment, rp: RoundPlan, state: State, outcome: RoundResults, server: ServerOptimizer,
    private: PrivateAggregator | None = None,
) -> tuple[State, dict[str, Any]]:  # fmt: skip
    """Validate and aggregate the uploads (``private``: with client-level DP), evaluate, and
    build the round's metrics record."""
    cfg = exp.cfg
    results = outcome.results
    t = cfg.train
    flag_misreported_work([r.update for r in results], t.batch_size, t.local_steps, t.local_epochs)
    if private is not None:
        assert rp.population is not None
        averaged, report, method_record, updated = privacy.private_round(
            exp, rp.plan, rp.population, state, results, private
        )
    else:
        averaged, report, method_record = exp.strategy.aggregate(
            state, [r.update for r in results], exp.layer_of, cfg.federation.weighting
        )
        updated = {
            k for r in results if r.update.client in report.accepted for k in r.update.tensors
        }
    # the server optimizer moves only the tensors an accepted client trained (their moments)
    # (under DP the noise moves the model whoever was accepted: a round left unmoved would
    # tell that nobody was)
    # a round needs federation.min_replies *valid* updates (replies rejected above do not count)
    # (under DP min_replies is 1, refused otherwise: the noise moves the model every round)
    short = private is None and 0 < len(report.accepted) < cfg.federation.min_replies
    if short:
        logger.warning(
            "round %d: %d valid updates, fewer than federation.min_replies = %d: model unchanged",
            rp.round, len(report.accepted), cfg.federation.min_replies,
        )  # fmt: skip
    moved = (report.accepted and not short) or private is not None
    new_state = server.step(state, averaged, updated) if moved else state
    accepted = [r for r in results if r.update.client in report.accepted]
    weights = [r.update.num_examples for r in accepted]
    expected = exp.strategy.expected_coverage(rp.round, [a.client for a in rp.plan.clients])
    record: dict[str, Any] = {
        "round": rp.round,
        "lr": rp.lr,
        "sampled": rp.sampled,
        "allocation": [a.as_dict() for a in rp.plan.clients],
        "coverage": report.coverage,
        "expected_coverage": None if expected is None else [round(x, 4) for x in expected],
        "train_loss": float(np.average([r.update.train_loss for r in accepted], weights=weights))
        if accepted
        else None,
        "clients": [client_record(exp, r, report.rejected, rp.plan) for r in results],
        "rejected": {str(c): reason for c, reason in report.rejected.items()},
        "num_rejected": len(report.rejected),
        **({"below_min_replies": True} if short else {}),
        "failed": {str(c): reason for c, reason in outcome.failed.items()},
        **repairs_field(exp, rp.plan),
        **head_field(exp, rp),
        **method_record,  # e.g. HetLoRA's sparsity weights, FlexLoRA's singular values
        # the server's (evaluation, Fisher scores): a resumed run keeps them
        "precision": exp.accelerator.precision,
        "base_precision": exp.accelerator.base_precision,
        **rp.fisher_info,
    }
    if rp.round % cfg.federation.eval_every == 0 or rp.round == cfg.federation.rounds:
        e0 = time.perf_counter()
        record |= evaluate_global(exp, new_state, rp.round)
        record["eval_seconds"] = round(time.perf_counter() - e0, 4)
    record["round_seconds"] = round(time.perf_counter() - rp.started, 4)
    return new_state, record
