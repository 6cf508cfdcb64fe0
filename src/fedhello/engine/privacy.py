"""Client-level DP in the run loop (``[privacy]``, ``fedhello.core.privacy``): where the
round's aggregate is private, how many rounds the budget allows, and what the summary says.

The loop is the same on every engine: the server validates the uploads as always
(``accept``), then ``PrivateAggregator`` checks or clips them, sums them with noise and moves the
clip norm; the server optimizer then steps on the noisy means (post-processing: it costs no
privacy). The round's record gets ``clip_norm``, the noise, per-layer contributors and
noise-to-signal, ``epsilon`` and ``delta``; the summary the epsilon spent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedhello.core.aggregation import AggregationReport, State, accept
from fedhello.core.errors import ConfigError
from fedhello.core.layers import AllocationPlan
from fedhello.core.privacy.server import (
    PrivateAggregator,
    expected_counts,
    json_number,
    private_rounds,
)

if TYPE_CHECKING:
    from fedhello.core.config import Config
    from fedhello.engine.experiment import Experiment
    from fedhello.model.report import ClientResult

logger = logging.getLogger(__name__)


def start(cfg: Config) -> tuple[PrivateAggregator | None, int]:
    """The run's DP server (None without ``[privacy]``) and the last round it trains: all of
    ``federation.rounds``, or the last within ``privacy.target_epsilon``. A target that round 1
    already exceeds is refused here, before anything is loaded or written."""
    if not cfg.privacy.enabled:
        return None, cfg.federation.rounds
    private = PrivateAggregator(cfg)
    last = private_rounds(cfg)
    p, a = cfg.privacy, private.accounting
    if last == 0:
        raise ConfigError(
            f"privacy.target_epsilon = {p.target_epsilon:g}: one round already spends epsilon "
            f"{a.epsilon(1):.3g} (noise_multiplier {p.noise_multiplier:g}, {a.per_round} of "
            f"{a.num_clients} clients per round, delta {a.delta:.3g}); allowed: a target of "
            "at least that, or more noise or more clients"
        )
    if last < cfg.federation.rounds:
        logger.warning(
            "privacy.target_epsilon = %g: the run stops after round %d of %d (epsilon %.3f; "
            "round %d would spend %.3f)", p.target_epsilon, last, cfg.federation.rounds,
            a.epsilon(last), last + 1, a.epsilon(last + 1),
        )  # fmt: skip
    logger.info(
        "client-level DP: noise multiplier %g (updates %.4g), clip norm %g (%s, on the %s), "
        "epsilon %.3f at delta %.3g after %d rounds, %s noise", p.noise_multiplier,
        private.update_multiplier, p.clip_norm, p.clipping, p.clip_on, a.epsilon(last),
        a.delta, last, p.noise,
    )  # fmt: skip
    if p.noise == "seeded":
        logger.warning(
            "privacy.noise = 'seeded': the noise and the client sampling derive from run.seed, "
            "which the run's config holds; the accounted epsilon holds only against whoever "
            "cannot learn the seed (a study's setting; a deployment wants 'secret')"
        )
    return private, last


def shortened(cfg: Config, last: int) -> Config:
    """``cfg`` as the run it is: a budget that stops it after round ``last`` makes it ``last``
    rounds long, so its learning-rate schedule, its head fine-tuning rounds and its final
    evaluation follow the rounds it trains (the run's config.toml keeps what was asked)."""
    fed, train = cfg.federation, cfg.train
    if last >= fed.rounds:
        return cfg
    return cfg.model_copy(update={
        "federation": fed.model_copy(update={"rounds": last}),
        "train": train.model_copy(
            update={"head_finetune_rounds": train.finetune_rounds(last)}
        ),
    })  # fmt: skip


def private_round(
    exp: Experiment,
    plan: AllocationPlan,
    population: AllocationPlan,
    state: State,
    results: Sequence[ClientResult],
    private: PrivateAggregator,
) -> tuple[State, AggregationReport, dict[str, Any], set[str]]:
    """The round's private aggregate: (the noisy means, who was accepted or rejected, the
    round's privacy record, the tensors it moved: every tensor some client's allocation holds
    this round (``population``), since each got noise)."""
    updates = [r.update for r in results]
    good, report = accept(
        state, updates, exp.layer_of, exp.num_layers, exp.cfg.federation.weighting
    )
    unclipped = {r.update.client: r.unclipped for r in results}
    averaged, dropped, record = private.aggregate(
        state, good, unclipped, population, exp.layer_of, plan.round
    )
    for update in good:
        if update.client in dropped:
            report.accepted.remove(update.client)
            report.rejected[update.client] = dropped[update.client]
            for layer in update.layers:
                report.coverage[layer] -= 1
    per_round = exp.cfg.clients.per_round
    return averaged, report, record, set(expected_counts(population, exp.layer_of, per_round))


def summary(private: PrivateAggregator | None, last: int) -> dict[str, Any]:
    """The summary's privacy keys: epsilon spent over the rounds trained, delta, the noise, where
    it came from, and the clip norm the run ended with; ``stopped_by`` (and the rounds asked
    for) where the budget shortened it."""
    if private is None:
        return {}
    p = private.cfg.privacy
    out: dict[str, Any] = {
        "epsilon": json_number(private.accounting.epsilon(last)),
        "delta": private.accounting.delta,
        "noise_multiplier": p.noise_multiplier,  # z, as accounted (a round's record: the updates')
        # adaptive clipping's updates get less, the count's noise taking its share (README)
        **(
            {"update_noise_multiplier": round(private.update_multiplier, 8)}
            if p.clipping == "adaptive"
            else {}
        ),
        "noise": p.noise,
        "clip_norm_final": round(private.clip_norm, 8),
        "rounds_trained": last,
    }
    if last < private.cfg.federation.rounds:
        out["stopped_by"] = "privacy.target_epsilon"
        out["rounds_configured"] = private.cfg.federation.rounds
    return out
