"""The federation core shared by every engine: open a round (sample, Fisher refresh, allocate),
close it (validate, aggregate per layer, evaluate, record), and the run loop with metrics,
checkpoints, resume and the final adapter. Engines only differ in how the sampled clients
train: in this process (``simulation``) or as Flower messages (``flower``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedhello.aggregation import ServerMomentum, aggregate_masked
from fedhello.config import Config
from fedhello.experiment import Experiment, build_experiment, sample_clients
from fedhello.masks import AllocationPlan
from fedhello.runs import RunDir
from fedhello.training import ClientResult, lr_at

logger = logging.getLogger(__name__)

State = dict[str, np.ndarray]


class Observer(Protocol):
    """Progress hooks; the CLI renders them, tests may record them."""

    def on_start(self, exp: Experiment) -> None: ...
    def on_round_start(self, round_: int, plan: AllocationPlan) -> None: ...
    def on_client_end(self, round_: int, result: ClientResult) -> None: ...
    def on_round_end(self, record: dict[str, Any]) -> None: ...
    def on_final_eval(self) -> None: ...


class _Silent:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@dataclass
class RoundPlan:
    """What the server decided at the start of a round."""

    round: int
    sampled: list[int]
    plan: AllocationPlan
    lr: float
    fisher_info: dict[str, Any]
    started: float


# (experiment, round plan, global state, observer) -> (results, failed clients -> reason)
Trainer = Callable[[Experiment, RoundPlan, State, Any], tuple[list[ClientResult], dict[int, str]]]


def client_record(
    exp: Experiment, result: ClientResult, rejected: dict[int, str]
) -> dict[str, Any]:
    u = result.update
    rec = {
        "client": u.client,
        "tier": exp.tiers[u.client],
        "budget": exp.budgets[u.client],
        "layers": list(u.layers),
        "num_examples": u.num_examples,
        "steps": result.steps,
        "train_loss": u.train_loss,
        "trainable_params": result.trainable_params,
        "seconds": round(result.seconds, 4),
        "peak_memory_mb": round(result.peak_memory_mb, 1),
        "train_memory_mb": round(result.train_memory_mb, 3),
        "bytes_up": result.bytes_up,
        "bytes_down": result.bytes_down,
        "accepted": u.client not in rejected,
    }
    if u.client in rejected:
        rec["rejected_reason"] = rejected[u.client]
    return rec


def evaluate_global(exp: Experiment, state: dict[str, np.ndarray]) -> dict[str, Any]:
    from fedhello.evaluation import evaluate
    from fedhello.lora import set_state

    set_state(exp.model, state)
    bs = exp.cfg.train.eval_batch_size
    test = evaluate(exp.model, exp.data, exp.eval_test, bs)
    val = evaluate(exp.model, exp.data, exp.eval_val, bs) if len(exp.eval_val) else None
    out = {
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test_loss": test["loss"],
        "eval_examples": test["examples"],
        "eval_subset": test["examples"] < len(exp.raw.splits["test"]),
    }
    if val:
        out |= {"val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"]}
    return out


def refresh_fisher(exp: Experiment, round_: int, state: dict[str, np.ndarray]) -> dict[str, Any]:
    """For Fisher-based strategies: recompute the scores at refresh rounds; report them."""
    strategy: Any = exp.strategy
    if not getattr(strategy, "uses_fisher", False):
        return {}
    info: dict[str, Any] = {}
    if strategy.needs_scores(round_):
        from fedhello.fisher import fisher_scores
        from fedhello.lora import set_state

        t0 = time.perf_counter()
        set_state(exp.model, state)
        scores = fisher_scores(
            exp.model, exp.data, exp.proxy, exp.layer_of, exp.num_layers,
            exp.cfg.allocation.fisher_batch_size,
        )  # fmt: skip
        strategy.observe_scores(round_, scores)
        info["fisher_seconds"] = round(time.perf_counter() - t0, 4)
        logger.info("round %d Fisher scores %s", round_, np.round(scores, 6).tolist())
    info["layer_scores"] = None if strategy.scores is None else strategy.scores.tolist()
    info["layer_probabilities"] = strategy.layer_probabilities(round_)
    return info


def _expected(exp: Experiment, round_: int, clients: list[int]) -> list[float] | None:
    """Expected coverage of randomized strategies, to compare with the realized one."""
    fn = getattr(exp.strategy, "expected_coverage", None)
    return None if fn is None else [round(x, 4) for x in fn(round_, clients)]


def open_round(exp: Experiment, round_: int, state: State) -> RoundPlan:
    cfg = exp.cfg
    t0 = time.perf_counter()
    sampled = sample_clients(cfg.run.seed, round_, cfg.clients.num_clients, cfg.clients.per_round)
    fisher_info = refresh_fisher(exp, round_, state)
    plan = exp.strategy.allocate(round_, sampled)
    lr = lr_at(
        round_, cfg.federation.rounds, cfg.train.lr, cfg.train.lr_schedule, cfg.train.lr_min_factor
    )
    return RoundPlan(round_, sampled, plan, lr, fisher_info, t0)


def close_round(
    exp: Experiment,
    rp: RoundPlan,
    state: State,
    results: list[ClientResult],
    momentum: ServerMomentum,
    failed: dict[int, str] | None = None,
) -> tuple[State, dict[str, Any]]:
    """Validate and aggregate the uploads, evaluate, and build the round's metrics record."""
    cfg = exp.cfg
    averaged, report = aggregate_masked(
        state, [r.update for r in results], exp.layer_of, exp.num_layers, cfg.federation.weighted
    )
    updated = {k for r in results if r.update.client in report.accepted for k in r.update.tensors}
    new_state = momentum.step(state, averaged, updated) if report.accepted else state
    accepted = [r for r in results if r.update.client in report.accepted]
    weights = [r.update.num_examples for r in accepted]
    record: dict[str, Any] = {
        "round": rp.round,
        "lr": rp.lr,
        "sampled": rp.sampled,
        "allocation": [a.as_dict() for a in rp.plan.clients],
        "coverage": report.coverage,
        "expected_coverage": _expected(exp, rp.round, [a.client for a in rp.plan.clients]),
        "train_loss": float(np.average([r.update.train_loss for r in accepted], weights=weights))
        if accepted
        else None,
        "clients": [client_record(exp, r, report.rejected) for r in results],
        "rejected": {str(c): reason for c, reason in report.rejected.items()},
        "num_rejected": len(report.rejected),
        "failed": {str(c): reason for c, reason in (failed or {}).items()},
        **rp.fisher_info,
    }
    if rp.round % cfg.federation.eval_every == 0 or rp.round == cfg.federation.rounds:
        e0 = time.perf_counter()
        record |= evaluate_global(exp, new_state)
        record["eval_seconds"] = round(time.perf_counter() - e0, 4)
    record["round_seconds"] = round(time.perf_counter() - rp.started, 4)
    return new_state, record


def run_federation(
    cfg: Config,
    run: RunDir,
    trainer: Trainer,
    observer: Any = None,
    overwrite: bool = False,
    resume: bool = False,
    engine: str = "embedded",
    prepare: Callable[[Experiment], None] | None = None,
    final_extra: Callable[[Experiment, State], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the whole federation; write metrics, checkpoints, summary and adapter into ``run``.
    ``final_extra`` adds an engine's own scores of the final model to the summary (Flower: the
    sites' evaluation on their held-out data).

    A new run checks its directory first and creates it only once the experiment is built (a
    bad model or data path leaves nothing behind). ``resume`` continues a run from its last
    intact checkpoint; the rounds after it are recomputed, so the result equals an
    uninterrupted run.
    """
    from fedhello.checkpoint import config_hash, load_latest, save_checkpoint

    obs = observer or _Silent()
    wall0 = time.perf_counter()
    if resume and run.summary_path.is_file():
        logger.info("run %s already finished: nothing to do", run.path)
        return run.read_summary()
    if not resume:
        run.check_free(overwrite)
    exp = build_experiment(cfg)
    if prepare is not None:  # e.g. the Flower engine learns its nodes and their budgets
        prepare(exp)
    if not resume:
        run.create(overwrite)
        run.write_config(cfg)
    cfg_hash = config_hash(cfg.to_toml())
    state = exp.init_state
    momentum = ServerMomentum(cfg.federation.server_momentum, cfg.federation.server_lr)
    start = 1
    if resume:
        ckpt = load_latest(run.checkpoint_dir, cfg_hash, set(exp.keys))
        if ckpt is not None:
            state, momentum.velocity = ckpt.state, ckpt.velocity
            exp.strategy.load_state_dict(ckpt.strategy_state)
            start = ckpt.round + 1
        run.truncate_metrics(start - 1)
        logger.info("resuming %s at round %d", run.path, start)
    obs.on_start(exp)
    for round_ in range(start, cfg.federation.rounds + 1):
        rp = open_round(exp, round_, state)
        obs.on_round_start(round_, rp.plan)
        results, failed = trainer(exp, rp, state, obs)
        state, record = close_round(exp, rp, state, results, momentum, failed)
        run.append_metrics(record)
        obs.on_round_end(record)
        if round_ % cfg.run.checkpoint_every == 0 or round_ == cfg.federation.rounds:
            save_checkpoint(
                run.checkpoint_dir, round_, state, momentum.velocity,
                exp.strategy.state_dict(), cfg_hash, cfg.run.keep_checkpoints,
            )  # fmt: skip
    obs.on_final_eval()
    seconds = time.perf_counter() - wall0
    extra = final_extra(exp, state) if final_extra is not None else {}
    return finish(exp, run, state, seconds, engine, start if resume else None, extra)


def finish(
    exp: Experiment,
    run: RunDir,
    state: dict[str, np.ndarray],
    seconds: float,
    engine: str = "embedded",
    resumed_at: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Full-test evaluation, the PEFT adapter and summary.json (with ``extra`` in it)."""
    from fedhello.evaluation import evaluate
    from fedhello.lora import set_state

    cfg = exp.cfg
    set_state(exp.model, state)
    final = evaluate(exp.model, exp.data, exp.raw.splits["test"], cfg.train.eval_batch_size)
    exp.model.save_pretrained(str(run.adapter_dir))
    (run.adapter_dir / "labels.json").write_text(json.dumps(exp.raw.label_names) + "\n")
    records = run.read_metrics()
    clients = [c for r in records for c in r["clients"]]
    summary = {
        "strategy": cfg.allocation.strategy,
        "engine": engine,
        "test_split": "whole",
        "rounds": cfg.federation.rounds,
        "test_accuracy": final["accuracy"],
        "test_macro_f1": final["macro_f1"],
        "test_loss": final["loss"],
        "test_examples": final["examples"],
        "num_classes": len(exp.raw.label_names),
        "num_layers": exp.num_layers,
        "budgets": exp.budgets,
        "tiers": exp.tiers,
        "target": exp.strategy.target(),
        "model_source": exp.source,
        "wall_seconds": round(seconds, 2),
        "resumed_at_round": resumed_at,
        "client_seconds": round(sum(c["seconds"] for c in clients), 2),
        "bytes_up": sum(c["bytes_up"] for c in clients),
        "bytes_down": sum(c["bytes_down"] for c in clients),
        "rejected_updates": sum(r["num_rejected"] for r in records),
        **(extra or {}),
    }
    run.write_summary(summary)
    logger.info("finished: test accuracy %.4f", final["accuracy"])
    return summary
