"""The clients' resources in an experiment: their limits, the cost profile the limits are
checked with, and the fit policy, set up once the model exists (the profile measures it).

With budgets from the config alone (the default, the paper's) there is nothing to set up: no
limit, no profile, every plan passes through unchanged. With limits in real units the profile
comes from the run's own copy (a resumed run), from the profile store (another run measured the
same setting) or from the probe (stored only if its step times pass their checks:
``obtain_profile``); each client then gets the budget and floor its limit affords
(``fedhello.core.fit.allowance``), so strategies choose within it, and ``fit`` checks every
plan. A Flower node that declares its own limit brings its own profile, measured on its own
device (``set_client``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedhello.core.allocation import AllocationStrategy
from fedhello.core.budgets import apply_limit, client_limits, limit_source
from fedhello.core.coherence import MIN_STEPS
from fedhello.core.config import Config
from fedhello.core.errors import ConfigError
from fedhello.core.fit import ResourceLimit, apply_fit, fit_policy
from fedhello.core.layers import AllocationPlan
from fedhello.core.profile import CostProfile
from fedhello.model.accelerator import Accelerator
from fedhello.model.probe import measure_profile, synthetic_batch, upload_sizes
from fedhello.store.profiles import (
    key_differences,
    profile_dir,
    profile_key,
    profile_path,
    read_profile,
    write_profile,
)
from fedhello.tasks import Task

logger = logging.getLogger(__name__)


@dataclass
class ModelUnderTest:
    """What the probe needs of a built model: the model on its device and how it is keyed."""

    model: torch.nn.Module
    layer_of: Mapping[str, int | None]
    num_layers: int
    task: Task
    num_labels: int
    source: str
    accelerator: Accelerator


def setting_key(cfg: Config, m: ModelUnderTest) -> dict[str, Any]:
    """The profile key of ``cfg``'s setting on ``m``'s device, as this process would measure
    it (``fedhello.store.profiles.profile_key``)."""
    a = m.accelerator
    max_length = cfg.model.max_length if m.task.uses_max_length else None
    key = profile_key(cfg, m.source, m.task.name, m.num_layers, m.num_labels, a.device_name(),
                      a.precision, a.base_precision, max_length,
                      on_cpu=a.device.type == "cpu")  # fmt: skip
    pooling = getattr(m.model.config, "fedhello_pooling", None)
    if pooling is not None:  # a pooled head (no pooler): keyed so, head profiles stay valid
        key["pooling"] = pooling
    return key


def obtain_profile(
    cfg: Config, m: ModelUnderTest, steps: int = MIN_STEPS, remeasure: bool = False
) -> tuple[CostProfile, str]:
    """The stored profile of this setting, or a fresh measurement; returns it with
    ``"reused"``, ``"measured"`` (and stored) or ``"not stored"``.

    Only a profile whose step times passed their checks (``fedhello.core.coherence``) is
    stored: one that fails is measured once more, and if it fails again it is used for this
    run alone and the reason logged in one line. Its memory is as good as any (a count of
    bytes, not a time), so memory and upload limits are checked with it; a step-time limit
    is refused (``fedhello.core.fit.allowance``) rather than set on noise. A profile of fewer
    than ``MIN_STEPS`` timed steps (``fedhello calibrate --steps``) is used, never stored."""
    accelerator = m.accelerator
    key = setting_key(cfg, m)
    path = profile_path(profile_dir(cfg), key)
    found = None if remeasure else read_profile(path, key)
    if found is not None:
        logger.info("cost profile reused: %s", path)
        return found, "reused"
    t0 = time.perf_counter()
    batch = synthetic_batch(m.model, m.task, cfg.train.batch_size, cfg.model.max_length,
                            m.num_labels)  # fmt: skip
    profile = measure_profile(m.model, m.layer_of, m.num_layers, batch, accelerator, key, steps,
                              cfg.train.max_grad_norm, cfg.train)  # fmt: skip
    if profile.step_time_problem is not None and steps >= MIN_STEPS:
        logger.info("cost profile's step times incoherent (%s): measuring again",
                    profile.step_time_problem)  # fmt: skip
        profile = measure_profile(m.model, m.layer_of, m.num_layers, batch, accelerator, key,
                                  steps, cfg.train.max_grad_norm, cfg.train)  # fmt: skip
    seconds = time.perf_counter() - t0
    if profile.step_time_problem is not None:
        logger.warning(
            "cost profile measured in %.1f s, not stored: %s; memory and upload limits use it "
            "for this run, a step-time limit is refused", seconds, profile.step_time_problem,
        )  # fmt: skip
        return profile, "not stored"
    write_profile(path, profile)
    logger.info("cost profile measured in %.1f s: %s", seconds, path)
    return profile, "measured"


def upload_only_profile(
    state: Mapping[str, Any], layer_of: Mapping[str, int | None], num_layers: int
) -> CostProfile:
    """Tensor sizes only: what an upload limit on top of layer budgets needs."""
    head, per_layer = upload_sizes(state, layer_of, num_layers)
    return CostProfile({}, num_layers, {}, per_layer, head)


@dataclass
class Resources:
    """Per client: its limit (None: a budget only) and the profile it is checked with."""

    limits: list[ResourceLimit | None]
    profiles: list[CostProfile | None]
    policy: str  # repair, strict or off (resolved)
    configured: str = "auto"  # allocation.fit as configured
    profile: CostProfile | None = None  # the config's limits are checked with this one
    profile_source: str | None = None  # measured, reused (the store) or run (its own copy)
    checkpointing: bool = False  # train.gradient_checkpointing: the CPU meter cannot see it

    def fit(self, plan: AllocationPlan) -> AllocationPlan:
        return apply_fit(plan, self.limits, self.profiles, self.policy)

    def fit_everyone(self, plan: AllocationPlan) -> AllocationPlan:
        """``plan`` of every client (DP's expected counts) as each would train if sampled:
        repaired quietly, and under ``strict`` repaired too rather than refused (a client is
        refused when it is sampled, by ``fit``)."""
        policy = "repair" if self.policy == "strict" else self.policy
        return apply_fit(plan, self.limits, self.profiles, policy, quiet=True)

    def record(self, client: int) -> dict[str, Any]:
        """The limit fields of a client's record (none for a client without a limit)."""
        limit = self.limits[client]
        return {} if limit is None else limit.as_record()

    def set_client(
        self, strategy: AllocationStrategy, client: int, limit: ResourceLimit,
        profile: CostProfile | None, who: str, layer_count: int | None = None,
    ) -> None:  # fmt: skip
        """A limit declared for one client (a Flower node), checked with its own profile
        (else the server's); ``layer_count``: a layer budget the limit caps (an upload limit
        under layer budgets), None where the limit alone sets the count."""
        profile = profile or self.profile
        if profile is None:
            raise ValueError(f"{who}: a limit of {limit} needs a cost profile")
        check_measure(self.checkpointing, limit, profile, who)
        if self.configured == "auto":
            self.policy = "repair"  # a limit is enforced unless told otherwise (as the config's)
        if self.policy == "off" and limit.needs_profile:
            logger.warning("%s: allocation.fit = off: its limit of %s is not enforced", who, limit)
        apply_limit(strategy, client, limit, profile, who, layer_count, floors=self.policy != "off")
        self.limits[client], self.profiles[client] = limit, profile


def check_measure(
    checkpointing: bool, limit: ResourceLimit, profile: CostProfile, who: str
) -> None:
    """Refuse a memory limit the measure cannot see: with gradient checkpointing the CPU's
    training-memory meter counts the block inputs kept, not the block recomputed in the
    backward pass (a tiny BERT, every block trained: 12 MB metered with it, less than the 36
    MB its top block alone meters without it, which the backward pass still rebuilds), so a
    limit would afford layer sets that exceed it. An accelerator's allocator peak sees it."""
    if limit.memory_mb is not None and checkpointing and profile.memory_measure == "meter":
        raise ConfigError(
            f"{who}: a memory limit with train.gradient_checkpointing = true on a CPU: its "
            "training-memory meter does not see the blocks checkpointing recomputes, so the "
            "limit would not hold; allowed: gradient_checkpointing = false with memory limits "
            "on a CPU, or an accelerator (its allocator's peak is measured)"
        )


def setup_resources(
    cfg: Config,
    strategy: AllocationStrategy,
    m: ModelUnderTest,
    state: Mapping[str, Any],
    saved: CostProfile | None = None,
) -> Resources:
    """The clients' limits from the config, their profile, and the budgets they afford."""
    limits = client_limits(cfg)
    policy = fit_policy(cfg.allocation.fit, any(limit is not None for limit in limits))
    if all(limit is None for limit in limits):
        return Resources(limits, [None] * len(limits), policy, cfg.allocation.fit)
    if not any(limit is not None and limit.needs_profile for limit in limits):
        profile, source = upload_only_profile(state, m.layer_of, m.num_layers), None
    elif saved is not None:  # a resumed run's own copy: used whatever its key, to repair as before
        profile, source = saved, "run"
        differ = key_differences(saved.key, setting_key(cfg, m))
        if differ:
            logger.warning(
                "resuming with the run's own cost profile, measured for another setting than "
                "today's (%s differ): it is used as it was, so the run repairs as it did",
                ", ".join(differ),
            )  # fmt: skip
    else:
        profile, source = obtain_profile(cfg, m)
    checkpointing = cfg.train.gradient_checkpointing
    for client, limit in enumerate(limits):
        if limit is not None:
            check_measure(checkpointing, limit, profile, limit_source(cfg, client))
    if policy == "off" and cfg.clients.real_limits:
        logger.warning(
            "allocation.fit = off: the clients' limits (%s) only set their layer counts and "
            "are not enforced; a layer set may exceed them", cfg.clients.budget_kind,
        )  # fmt: skip
    counts = list(strategy.budgets)  # layer budgets, capped below by an upload limit
    for client, limit in enumerate(limits):
        if limit is not None:
            layer_count = None if cfg.clients.real_limits else counts[client]
            apply_limit(strategy, client, limit, profile, limit_source(cfg, client),
                        layer_count, floors=policy != "off")  # fmt: skip
    return Resources(
        limits, [profile] * len(limits), policy, cfg.allocation.fit, profile, source, checkpointing
    )
