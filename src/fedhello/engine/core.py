"""The federation's run loop, shared by every engine: build the experiment, FedNCM's round 0,
then round after round (opened and closed by ``fedhello.engine.rounds``: sample, allocate,
aggregate, evaluate, record) with metrics, checkpoints and resume; the run's end (final scores,
adapter, summary) is ``fedhello.engine.summary``.

Engines differ only in how the sampled clients train, and talk to the loop through one
protocol, :class:`Engine`: in this process (``fedhello.engine.embedded``) or as Flower
messages (``fedhello.engine.flower``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedhello.core.aggregation import State
from fedhello.core.config import Config
from fedhello.core.heads import ClassSums, class_means_head
from fedhello.core.layers import AllocationPlan
from fedhello.core.privacy.server import PREFIX as PRIVACY
from fedhello.core.server_optimizers import server_optimizer
from fedhello.engine import generative, privacy
from fedhello.engine.experiment import DataCache, Experiment, build_experiment
from fedhello.engine.rounds import RoundPlan, RoundResults, close_round, open_round
from fedhello.engine.summary import finish
from fedhello.model import determinism
from fedhello.model.accelerator import accelerator_for
from fedhello.model.class_means import linear_head
from fedhello.model.report import ClientResult
from fedhello.store.checkpoint import config_hash, load_latest, save_checkpoint
from fedhello.store.profiles import read_profile, write_profile
from fedhello.store.runs import RunDir

logger = logging.getLogger(__name__)


class Observer:
    """Progress hooks, silent by default; the CLI renders them, tests may record them."""

    def on_start(self, exp: Experiment) -> None: ...
    def on_round_start(self, round_: int, plan: AllocationPlan) -> None: ...
    def on_client_end(self, round_: int, result: ClientResult) -> None: ...
    def on_round_end(self, record: dict[str, Any]) -> None: ...
    def on_final_eval(self) -> None: ...


class Engine(Protocol):
    """How the sampled clients of a round are reached. The run loop calls ``start`` once,
    after the experiment is built and before the run directory is created (a Flower engine
    learns its nodes and their budgets or limits there, so a bad node leaves nothing behind), then
    ``train_round`` every round, and ``final_scores`` after the last one."""

    name: str

    def start(self, exp: Experiment) -> None: ...

    def train_round(
        self, exp: Experiment, rp: RoundPlan, state: State, observer: Observer
    ) -> RoundResults: ...

    def final_scores(self, exp: Experiment, state: State) -> dict[str, Any]:
        """The engine's own scores of the final model for the summary (Flower: the sites')."""
        ...

    def class_sums(self, exp: Experiment, state: State) -> tuple[list[ClassSums], dict[int, str]]:
        """FedNCM's round 0 (``train.head = "class-means"``): every client's per-class feature
        sums and counts under ``state`` (``fedhello.model.class_means``), and the clients that
        failed, with why."""
        ...


@dataclass
class RunOptions:
    """How to run, as opposed to what (the config): progress hooks, replacing an existing
    run directory, continuing one, and data shared with other runs of this process."""

    observer: Observer = field(default_factory=Observer)
    overwrite: bool = False
    resume: bool = False
    cache: DataCache | None = None


def class_means_round(
    exp: Experiment, engine: Engine, state: State
) -> tuple[State, dict[str, Any]]:
    """FedNCM's round 0: every client's class sums under ``state`` (the initial global state),
    and the state with the head built from them (``fedhello.core.heads.class_means_head``)."""
    t0 = time.perf_counter()
    sums, failed = engine.class_sums(exp, state)
    new_state, info = class_means_head(state, exp.layer_of, sums)
    if failed:
        info["failed"] = {str(c): reason for c, reason in sorted(failed.items())}
    info["seconds"] = round(time.perf_counter() - t0, 4)
    if not info["classes_built"]:
        logger.warning("round 0: no class means (no client sent any): the head stays as it was")
    logger.info(
        "round 0: head built from the class means of %d clients, %d examples, %d classes",
        len(info["clients"]), info["examples"], info["classes_built"],
    )  # fmt: skip
    return new_state, info


def machine_change(before: dict[str, Any], now: dict[str, Any], round_: int) -> dict[str, Any]:
    """``{}`` when a resume computes with what the checkpoint's rounds did; else what changed
    (``what``: the keys; a value ``mixed``: an earlier resume already changed it), logged
    as a warning: the run no longer equals an uninterrupted one."""
    what = [k for k in ("device", "torch_threads") if k in before and before[k] != now[k]]
    if not what:
        return {}
    logger.warning(
        "resuming at round %d with %s where the rounds so far ran with %s: from here the "
        "arithmetic differs, so the run no longer equals an uninterrupted one (summary.json "
        "keeps machine_changed; fedhello compare will not reuse it)",
        round_, {k: now[k] for k in what}, {k: before[k] for k in what},
    )  # fmt: skip
    return {"at_round": round_, "what": what, "before": before, "after": now}


def run_federation(
    cfg: Config, run: RunDir, engine: Engine, options: RunOptions | None = None
) -> dict[str, Any]:
    """Run the whole federation on ``engine``; write metrics, checkpoints, summary and adapter
    into ``run``; return the summary.

    A new run checks its directory first and creates it only once the experiment is built
    and the engine started (a bad model, data path or node leaves nothing behind).
    ``options.resume`` continues a run from its last intact checkpoint; the rounds after it
    are recomputed, so the result equals an uninterrupted run. The summary's ``wall_seconds``
    is the run's total: the wall time up to that checkpoint (kept in it, summed over every
    process so far) plus this process's.
    """
    opts = options or RunOptions()
    obs = opts.observer
    wall0 = time.perf_counter()
    if opts.resume and run.summary_path.is_file():
        logger.info("run %s already finished: nothing to do", run.path)
        return run.read_summary()
    if not opts.resume:
        run.check_free(opts.overwrite)
    private, last = privacy.start(cfg)  # a privacy budget round 1 exceeds fails here
    # device and precision first: a missing GPU fails before anything is loaded; a resumed
    # run keeps the precision it has run in so far
    accelerator = accelerator_for(cfg, run.recorded_precision() if opts.resume else None)
    saved = read_profile(run.profile_path) if opts.resume else None  # repair as before
    # a privacy budget that stops the run early makes it that many rounds long (schedule,
    # head fine-tuning, final evaluation); the run's config.toml keeps what was asked
    exp = build_experiment(
        privacy.shortened(cfg, last), cache=opts.cache, accelerator=accelerator,
        saved_profile=saved,
    )  # fmt: skip
    if exp.cfg.train.head == "class-means":
        linear_head(exp.model)  # a head class means cannot build fails before anything is written
    engine.start(exp)
    # what repeats exactly: said once the run can start (a bad model, data path or node is
    # the only line of a run that cannot)
    determinism.log_run(cfg.train.deterministic, accelerator.device)
    if not opts.resume:
        run.create(opts.overwrite)
        run.write_config(cfg)
    if exp.resources.profile is not None and exp.resources.profile.table and saved is None:
        write_profile(run.profile_path, exp.resources.profile)
    # the checkpoints belong to the run's config.toml as written when it started (on resume the
    # file, not today's rendering of it: a key added to fedhello since must not orphan them)
    cfg_hash = config_hash(run.config_path.read_text(encoding="utf-8"))
    state = exp.init_state
    server = server_optimizer(cfg.federation)
    start = 1
    before = 0.0  # the run's wall time before this process: a resumed checkpoint's
    # what this process computes with: a resume elsewhere is said, and kept in the summary
    machine = {"device": accelerator.device.type, "torch_threads": torch.get_num_threads()}
    changed: dict[str, Any] = {}
    if opts.resume:
        ckpt = load_latest(run.checkpoint_dir, cfg_hash, set(exp.keys))
        if ckpt is not None and ckpt.machine:
            changed = machine_change(ckpt.machine, machine, ckpt.round + 1)
        if ckpt is not None:
            state = ckpt.state
            server.load_state_dict(
                {k: v for k, v in ckpt.optimizer_state.items() if not k.startswith(PRIVACY)}
            )
            if private is not None:
                private.load_state_dict(ckpt.optimizer_state)
            exp.strategy.load_state_dict(ckpt.strategy_state)
            start = ckpt.round + 1
            if ckpt.wall_seconds is None:  # written before checkpoints kept it
                logger.info("checkpoint of round %d has no wall time: wall_seconds will count "
                            "this process alone", ckpt.round)  # fmt: skip
            before = ckpt.wall_seconds or 0.0
        run.truncate_metrics(start - 1)
        logger.info("resuming %s at round %d", run.path, start)
    if generative.is_generative(exp):  # the base model's answers: the reference, measured once
        generative.zero_shot(exp, run, exp.init_state)
    obs.on_start(exp)
    round0 = None  # FedNCM's head, built before round 1 (a resumed run has it in its state)
    if start == 1 and exp.cfg.train.head == "class-means":  # resolved from auto by the build
        state, round0 = class_means_round(exp, engine, state)
    if start == 1 and private is not None and private.key is not None:
        # DP's secret key, kept before any round is released: a crash before the first
        # periodic checkpoint must not let the resumed run draw a second key (the same rounds
        # released again under independent noise, which the accountant never counted)
        save_checkpoint(
            run.checkpoint_dir, 0, state, server.state_dict() | private.state_dict(),
            exp.strategy.state_dict(), cfg_hash, cfg.run.keep_checkpoints, machine,
            wall_seconds=before + time.perf_counter() - wall0,
        )  # fmt: skip
    for round_ in range(start, last + 1):
        rp = open_round(exp, round_, state, round0 if round_ == 1 else None, private)
        obs.on_round_start(round_, rp.plan)
        outcome = engine.train_round(exp, rp, state, obs)
        state, record = close_round(exp, rp, state, outcome, server, private)
        run.append_metrics(record)
        obs.on_round_end(record)
        if round_ % cfg.run.checkpoint_every == 0 or round_ == last:
            server_state = server.state_dict() | (private.state_dict() if private else {})
            save_checkpoint(
                run.checkpoint_dir, round_, state, server_state,
                exp.strategy.state_dict(), cfg_hash, cfg.run.keep_checkpoints,
                machine if not changed else {**machine, **dict.fromkeys(changed["what"], "mixed")},
                wall_seconds=before + time.perf_counter() - wall0,
            )  # fmt: skip
    obs.on_final_eval()
    seconds = before + time.perf_counter() - wall0  # the run's, over all its processes
    extra = engine.final_scores(exp, state) | privacy.summary(private, last)
    if changed:
        extra["machine_changed"] = changed
    return finish(exp, run, state, seconds, engine.name, start if opts.resume else None, extra)
