"""Heterogeneous LoRA allocation strategies, one per module, behind one registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Importing the modules registers the strategies.
from fedhello.allocation import (  # noqa: F401
    baselines,
    fed_hello,
    fedra,
    fisher,
    full,
    geometric,
    randomized_geometric,
)
from fedhello.allocation.base import (
    AllocationStrategy,
    register,
    strategy_class,
    strategy_names,
)
from fedhello.allocation.shapes import SHAPES

__all__ = [
    "SHAPES",
    "AllocationStrategy",
    "build_strategy",
    "register",
    "strategy_class",
    "strategy_names",
]


def build_strategy(
    name: str, num_layers: int, budgets: Sequence[int], seed: int, options: Any = None
) -> AllocationStrategy:
    """Instantiate the strategy registered under ``name``."""
    return strategy_class(name)(num_layers, budgets, seed, options)
