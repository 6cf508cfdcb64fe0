"""Client budgets: how many LoRA layers each client can afford to train in a round.

The paper's main setting has three equal tiers training 6, 9 and 12 of 12 layers; for
MiniLM-L6's 6 layers the default tier values (1/2, 3/4, all) give budgets of 3, 5 and 6 layers
(fractions are rounded up: a client that can afford 4.5 layers is given 5 rather than 4).

With ``clients.budget_kind`` in real units (``memory-mb``, ``step-seconds``) or an upload limit,
the tier values and per-client values (``clients.tiers``, ``clients.budgets``) are limits,
:class:`ResourceLimit` s (``client_limits``); a measured cost profile turns each into a budget
and a floor (``fedhello.core.fit.allowance``), which the strategy gets through ``set_budget``
once the profile exists. The profile is the one cost model: measured
where it can be, its fitted linear model (``fedhello.core.profile.AnalyticFit``) between the
measurements. (The older relative tiers, ``clients.tier_kind = "cost" | "memory"``, priced
layer sets with a constant fitted once on one model and machine; they are retired.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedhello.core.allocation import AllocationStrategy, build_strategy
from fedhello.core.errors import ConfigError
from fedhello.core.fit import ResourceLimit, allowance
from fedhello.core.profile import CostProfile

if TYPE_CHECKING:
    from fedhello.core.config import Config

logger = logging.getLogger(__name__)


def tier_of(client: int, num_clients: int, num_tiers: int) -> int:
    """Clients are split into equal contiguous tiers: 12 clients, 3 tiers -> 4 per tier."""
    return client * num_tiers // num_clients


def tier_layers(value: float, num_layers: int) -> int:
    """A tier's budget: its tier value (a fraction of the layers) of ``num_layers``, rounded
    up."""
    n = math.ceil(value * num_layers - 1e-9)
    if n < 1:
        raise ConfigError(
            f"clients.tiers value {value} fits no layer of {num_layers}; allowed: a fraction "
            "in (0, 1] of the LoRA layers"
        )
    return min(num_layers, n)


def client_budgets(
    num_clients: int,
    num_layers: int,
    tiers: Sequence[float],
    budgets: Sequence[int] | None = None,
) -> list[int]:
    """Budget (a layer count) per client, from explicit ``budgets`` or else from the tier
    values (fractions of the layers)."""
    if budgets is not None:
        too_big = [b for b in budgets if b > num_layers]
        if too_big:
            raise ConfigError(
                f"clients.budgets = {list(budgets)}: {too_big[0]} layers is more than the "
                f"model's {num_layers} LoRA layers; allowed: 1..{num_layers}"
            )
        return list(budgets)
    layer_counts = [tier_layers(t, num_layers) for t in tiers]
    return [layer_counts[tier_of(c, num_clients, len(tiers))] for c in range(num_clients)]


def client_tiers(
    num_clients: int, num_tiers: int, per_client: Sequence[float] | None = None
) -> list[int]:
    """Each client's tier: equal-size tiers in client order, or with explicit per-client
    values (``clients.budgets``: budgets, or limits in real units) the rank of the client's
    value among the distinct values (7 / 4 / 1 clients with 3 / 5 / 6 layers are tiers
    0 / 1 / 2, whatever their number)."""
    if per_client is not None:
        distinct = sorted(set(per_client))
        return [distinct.index(v) for v in per_client]
    return [tier_of(c, num_clients, num_tiers) for c in range(num_clients)]


def strategy_for(cfg: Config, num_layers: int) -> AllocationStrategy:
    """The allocation strategy of ``cfg`` for a model of ``num_layers`` blocks, owning the
    clients' budgets (from ``clients.budgets`` or the tier values). Pure: no torch."""
    note = cfg.allocation.foreign_note()
    if note:
        logger.warning(note)
    c = cfg.clients
    if c.real_limits:  # placeholders until the profile gives the budgets (apply_limit)
        budgets = [num_layers] * c.num_clients
    else:
        ints = None if c.budgets is None else [int(b) for b in c.budgets]
        budgets = client_budgets(c.num_clients, num_layers, c.tiers, ints)
    strategy = build_strategy(
        cfg.allocation.strategy, num_layers, budgets, cfg.run.seed, cfg.allocation.options
    )
    strategy.configure_adapter(cfg.lora.r, cfg.lora.freeze_a)
    return strategy


def client_limits(cfg: Config) -> list[ResourceLimit | None]:
    """Each client's limit in real units (None: a budget only, nothing to check)."""
    c = cfg.clients
    if not c.real_limits and c.upload_mb is None:
        return [None] * c.num_clients
    out: list[ResourceLimit | None] = []
    tiers = client_tiers(c.num_clients, len(c.tiers), c.budgets)  # as the run records them
    for client in range(c.num_clients):
        tier = tiers[client]
        value = float(c.budgets[client] if c.budgets is not None else c.tiers[tier])
        upload = None if c.upload_mb is None else c.upload_mb[tier]
        out.append(
            ResourceLimit(
                memory_mb=value if c.budget_kind == "memory-mb" else None,
                step_seconds=value if c.budget_kind == "step-seconds" else None,
                upload_mb=upload,
            )
        )
    return out


def limit_source(cfg: Config, client: int) -> str:
    """Where a client's limit comes from, for error messages."""
    c = cfg.clients
    tier = client_tiers(c.num_clients, len(c.tiers), c.budgets)[client]
    keys = []
    if c.real_limits:  # memory or step time: the client's budget, or its tier's
        keys.append(
            f"clients.budgets[{client}]" if c.budgets is not None else f"clients.tiers[{tier}]"
        )
    if c.upload_mb is not None:
        keys.append(f"clients.upload_mb[{tier}]")
    return f"{' and '.join(keys)} (client {client})"


def apply_limit(
    strategy: AllocationStrategy,
    client: int,
    limit: ResourceLimit,
    profile: CostProfile,
    who: str,
    layer_count: int | None = None,
    floors: bool = True,
) -> None:
    """Give ``client`` the budget and floor its ``limit`` affords (capped by ``layer_count``,
    the budget from the config, for an upload limit on top of layer budgets). ``floors=False``
    (``allocation.fit = off``): the budget only, placed anywhere, as in the paper."""
    allowed = allowance(limit, profile, who)
    count = allowed.count if layer_count is None else min(layer_count, allowed.count)
    floor = allowed.floor if limit.needs_profile and floors else 0
    strategy.set_budget(client, count, floor)
