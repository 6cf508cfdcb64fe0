"""Client resource budgets: how many LoRA layers each client can afford to train.

The paper's main setting has three equal tiers training 6, 9 and 12 of 12 layers; for
MiniLM-L6's 6 layers the default tiers (1/2, 3/4, all) give 3, 5 and 6 layers (fractions are
rounded up: a client that can afford 4.5 layers is given 5 rather than 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedhello.errors import ConfigError


def tier_of(client: int, num_clients: int, num_tiers: int) -> int:
    """Clients are split into equal contiguous tiers: 12 clients, 3 tiers -> 4 per tier."""
    return client * num_tiers // num_clients


def client_budgets(
    num_clients: int,
    num_layers: int,
    tiers: Sequence[float],
    budgets: Sequence[int] | None = None,
) -> list[int]:
    """Layer count per client, from explicit ``budgets`` or else from tier fractions."""
    if budgets is not None:
        too_big = [b for b in budgets if b > num_layers]
        if too_big:
            raise ConfigError(
                f"clients.budgets = {list(budgets)}: {too_big[0]} layers is more than the "
                f"model's {num_layers} LoRA layers; allowed: 1..{num_layers}"
            )
        return list(budgets)
    layer_counts = [max(1, min(num_layers, math.ceil(f * num_layers - 1e-9))) for f in tiers]
    return [layer_counts[tier_of(c, num_clients, len(tiers))] for c in range(num_clients)]


def client_tiers(num_clients: int, num_tiers: int) -> list[int]:
    return [tier_of(c, num_clients, num_tiers) for c in range(num_clients)]
