"""Client resource budgets: how many LoRA layers each client can afford to train.

The paper's main setting has three equal tiers training 6, 9 and 12 of 12 layers; for
MiniLM-L6's 6 layers the default tiers (1/2, 3/4, all) give 3, 5 and 6 layers (fractions are
rounded up: a client that can afford 4.5 layers is given 5 rather than 4).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedhello.core.allocation import AllocationStrategy, build_strategy
from fedhello.core.costmodel import layers_for_cost
from fedhello.core.errors import ConfigError

if TYPE_CHECKING:
    from fedhello.core.config import Config

logger = logging.getLogger(__name__)


def tier_of(client: int, num_clients: int, num_tiers: int) -> int:
    """Clients are split into equal contiguous tiers: 12 clients, 3 tiers -> 4 per tier."""
    return client * num_tiers // num_clients


def tier_layers(value: float, num_layers: int, kind: str = "layers") -> int:
    """Layers a tier can train: a fraction of the layers (rounded up), or the most layers
    whose cheapest placement fits a relative cost or activation-memory limit."""
    if kind == "cost":
        n = layers_for_cost(value, num_layers)
    elif kind == "memory":
        n = math.floor(value * num_layers + 1e-9)
    else:
        n = math.ceil(value * num_layers - 1e-9)
    if n < 1:
        raise ConfigError(
            f"clients.tiers value {value} ({kind}) fits no layer of {num_layers}; the smallest "
            f"allowed {kind} limit trains the top layer alone"
        )
    return min(num_layers, n)


def client_budgets(
    num_clients: int,
    num_layers: int,
    tiers: Sequence[float],
    budgets: Sequence[int] | None = None,
    kind: str = "layers",
) -> list[int]:
    """Layer count per client, from explicit ``budgets`` or else from the tiers."""
    if budgets is not None:
        too_big = [b for b in budgets if b > num_layers]
        if too_big:
            raise ConfigError(
                f"clients.budgets = {list(budgets)}: {too_big[0]} layers is more than the "
                f"model's {num_layers} LoRA layers; allowed: 1..{num_layers}"
            )
        return list(budgets)
    layer_counts = [tier_layers(t, num_layers, kind) for t in tiers]
    return [layer_counts[tier_of(c, num_clients, len(tiers))] for c in range(num_clients)]


def client_tiers(num_clients: int, num_tiers: int) -> list[int]:
    return [tier_of(c, num_clients, num_tiers) for c in range(num_clients)]


def strategy_for(cfg: Config, num_layers: int) -> AllocationStrategy:
    """The allocation strategy of ``cfg`` for a model of ``num_layers`` blocks, owning the
    clients' layer budgets (from ``clients.budgets`` or the tiers). Pure: no torch."""
    note = cfg.allocation.foreign_note()
    if note:
        logger.warning(note)
    c = cfg.clients
    budgets = client_budgets(c.num_clients, num_layers, c.tiers, c.budgets, c.tier_kind)
    return build_strategy(
        cfg.allocation.strategy, num_layers, budgets, cfg.run.seed, cfg.allocation.options
    )
