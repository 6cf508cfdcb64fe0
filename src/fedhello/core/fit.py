"""Limits that hold: a client's limits in real units, the budget they afford, and the fit
policy that checks every allocated layer set against them (pure python: no torch).

A client's :class:`ResourceLimit` may bound its training memory (MB), the time of one local
step (s) and its upload per round (MB). With a measured :class:`CostProfile` that becomes an
:class:`Allowance`: the most layers it can train (placed at the top, the cheapest placement)
and the lowest block from which *any* set of that many layers still fits, so a strategy that
chooses within ``[floor, L)`` never needs a repair. The fit policy is the safety net for the
rest (a strategy that ignores floors, ``full``, a plan built elsewhere):

* ``repair``: move the shallowest allocated layer to the deepest free one, again and again,
  until the set fits; only when no free layer is left above it, drop the shallowest. No random
  draw, so the same plan gets the same repair in every run and every strategy of a comparison
  keeps its pairing. The original set is kept in ``ClientAllocation.repaired_from``.
* ``strict``: stop with one line naming round, client, set, predicted cost and limit.
* ``off``: the paper's semantics, a budget only; the run log warns that limits are not enforced.

A memory limit is checked in the profile's measure (``CostProfile.memory_measure``): on a CPU
the training memory a client records as ``train_memory_mb`` (the frozen model not included),
on an accelerator the allocator's peak it records as ``device_peak_memory_mb`` (everything the
step holds on the device, the frozen model included: what runs out). A step-time limit needs
a profile whose times passed their checks (``fedhello.core.coherence``); with any other it is
refused in one line rather than set on noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedhello.core.errors import ConfigError, UserError
from fedhello.core.layers import AllocationPlan
from fedhello.core.profile import CostProfile

logger = logging.getLogger(__name__)

MB = 2**20
# Measured memory (either measure) may exceed the profile's by this share: the probe measures
# full ``max_length`` batches (shorter batches only need less), but allocator and autocast-cache
# details vary a little between layer sets with the same lowest block and count.
MEMORY_TOLERANCE = 0.05


def recorded_memory_mb(record: Mapping[str, Any]) -> float:
    """What a client record's memory limit bounds: ``device_peak_memory_mb`` where the device
    reported one (the allocator measure), else ``train_memory_mb`` (the meter)."""
    peak = record.get("device_peak_memory_mb")
    return float(record["train_memory_mb"] if peak is None else peak)


@dataclass(frozen=True)
class ResourceLimit:
    """What one client may spend per local step (memory, time) and per round (upload)."""

    memory_mb: float | None = None
    step_seconds: float | None = None
    upload_mb: float | None = None

    def __str__(self) -> str:
        parts = []
        if self.memory_mb is not None:
            parts.append(f"{self.memory_mb:g} MB of training memory")
        if self.step_seconds is not None:
            parts.append(f"{self.step_seconds:g} s per step")
        if self.upload_mb is not None:
            parts.append(f"{self.upload_mb:g} MB of upload per round")
        return ", ".join(parts) or "no limit"

    @property
    def needs_profile(self) -> bool:
        """Memory and time need a measured profile; an upload limit only tensor sizes."""
        return self.memory_mb is not None or self.step_seconds is not None

    def as_record(self) -> dict[str, float | None]:
        """The limit as a client record shows it, next to what the client measured."""
        rec: dict[str, float | None] = {
            "memory_limit_mb": self.memory_mb,
            "step_limit_seconds": self.step_seconds,
        }
        if self.upload_mb is not None:
            rec["upload_limit_mb"] = self.upload_mb
        return rec


@dataclass(frozen=True)
class Allowance:
    """What a client can afford: ``count`` layers, all at or above block ``floor``."""

    count: int
    floor: int


def excesses(layers: Sequence[int], limit: ResourceLimit, profile: CostProfile) -> list[str]:
    """What ``layers`` would exceed, one phrase per limit (empty: it fits)."""
    if not layers:
        return []
    out = []
    if limit.needs_profile:
        cost = profile.cost(layers)
        memory = profile.memory_mb(layers) if limit.memory_mb is not None else 0.0
        # the allocator's peak may exceed the profile's by MEMORY_TOLERANCE (the meter's is
        # what it measured): a set fits where even that much more stays within the limit
        room = 1 + MEMORY_TOLERANCE if profile.memory_measure == "allocator" else 1.0
        if limit.memory_mb is not None and memory * room > limit.memory_mb:
            margin = f" (+{MEMORY_TOLERANCE:.0%} for the allocator)" if room > 1 else ""
            out.append(
                f"{memory:.1f} MB of {profile.memory_phrase}{margin} > {limit.memory_mb:g} MB"
            )
        if limit.step_seconds is not None and cost.step_seconds > limit.step_seconds:
            out.append(f"{cost.step_seconds:.3f} s per step > {limit.step_seconds:g} s")
    if limit.upload_mb is not None:
        up = profile.upload_bytes(layers) / MB
        if up > limit.upload_mb:
            out.append(f"{up:.3f} MB of upload > {limit.upload_mb:g} MB")
    return out


def fits(layers: Sequence[int], limit: ResourceLimit, profile: CostProfile) -> bool:
    return not excesses(layers, limit, profile)


def smallest_fitting(limit: ResourceLimit, profile: CostProfile) -> ResourceLimit:
    """The smallest limits of ``limit``'s kinds under which the top layer alone fits."""
    top = [profile.num_layers - 1]
    cost = profile.cost(top) if limit.needs_profile else None
    room = 1 + MEMORY_TOLERANCE if profile.memory_measure == "allocator" else 1.0
    return ResourceLimit(  # rounded up: the limit shown is one that fits
        None if limit.memory_mb is None else _up(profile.memory_mb(top) * room, 1),
        None if limit.step_seconds is None or cost is None else _up(cost.step_seconds, 3),
        None if limit.upload_mb is None else _up(profile.upload_bytes(top) / MB, 3),
    )


def _up(value: float, digits: int) -> float:
    """``value`` rounded up to ``digits`` decimals (20.04 MB -> 20.1: 20.0 would not fit)."""
    scale = 10**digits
    return math.ceil(value * scale - 1e-9) / scale


def allowance(limit: ResourceLimit, profile: CostProfile, who: str) -> Allowance:
    """The most layers ``limit`` affords (at the top) and the lowest block from which every
    set of that many layers fits; a ConfigError naming ``who`` if not even the top layer fits,
    or if ``limit`` bounds step time and the profile's times are not to be trusted.
    """
    if limit.step_seconds is not None and profile.step_time_problem is not None:
        raise ConfigError(
            f"{who}: a limit of {limit} needs step times, but this machine's cost profile has "
            f"none to trust ({profile.step_time_problem}); allowed: a memory or upload limit, "
            "or measure again on a quiet machine (fedhello calibrate --remeasure)"
        )
    L = profile.num_layers
    count = 0
    for n in range(1, L + 1):
        if fits(range(L - n, L), limit, profile):
            count = n
    if count == 0:
        raise ConfigError(
            f"{who}: a limit of {limit} fits no layer set (the top layer alone needs "
            f"{smallest_fitting(limit, profile)}{_measured_as(limit, profile)}); allowed: at "
            "least that"
        )
    floor = L - count
    # lower the floor while a set of ``count`` layers starting there still fits (the cost of a
    # set is that of its lowest block and its count: the contiguous one stands for them all)
    while floor > 0 and fits(range(floor - 1, floor - 1 + count), limit, profile):
        floor -= 1
    return Allowance(count, floor)


def _measured_as(limit: ResourceLimit, profile: CostProfile) -> str:
    """Where memory is the allocator's peak, the message says so."""
    if limit.memory_mb is None or profile.memory_measure != "allocator":
        return ""
    return f", its memory being {profile.memory_phrase}"


def repair(layers: Sequence[int], limit: ResourceLimit, profile: CostProfile) -> tuple[int, ...]:
    """The set moved up (and, only if that is not enough, shrunk) until it fits."""
    current = sorted(layers)
    L = profile.num_layers
    while current and not fits(current, limit, profile):
        over_upload = limit.upload_mb is not None and (
            profile.upload_bytes(current) / MB > limit.upload_mb
        )
        free_above = [x for x in range(L - 1, current[0], -1) if x not in current]
        if free_above and not over_upload:  # an upload depends on the count alone
            current = sorted([*current[1:], free_above[0]])
        else:
            current = current[1:]
    return tuple(current)


def apply_fit(
    plan: AllocationPlan,
    limits: Sequence[ResourceLimit | None],
    profiles: Sequence[CostProfile | None],
    policy: str,
    quiet: bool = False,
) -> AllocationPlan:
    """The plan with every set checked against its client's limit under ``policy``;
    ``quiet``: repairs not logged (a plan of every client, not of the round's)."""
    if policy == "off":
        return plan
    allocs = []
    for a in plan.clients:
        limit, profile = limits[a.client], profiles[a.client]
        if limit is None or profile is None or fits(a.layers, limit, profile):
            allocs.append(a)
            continue
        if policy == "strict":
            raise UserError(
                f"round {plan.round}, client {a.client}: layers {list(a.layers)} need "
                f"{'; '.join(excesses(a.layers, limit, profile))} (allocation.fit = strict); "
                "allowed: a set within the limit, or allocation.fit = repair"
            )
        fixed = repair(a.layers, limit, profile)
        log = logger.debug if quiet else logger.info
        log(
            "round %d client %d: layers %s exceed %s; repaired to %s",
            plan.round, a.client, list(a.layers), limit, list(fixed),
        )  # fmt: skip
        allocs.append(replace(a, layers=fixed, repaired_from=a.layers))
    return replace(plan, clients=tuple(allocs))


def fit_policy(configured: str, limited: bool) -> str:
    """``auto`` resolves to repair where clients have limits (real units, uploads), off with
    layer counts alone."""
    if configured != "auto":
        return configured
    return "repair" if limited else "off"
