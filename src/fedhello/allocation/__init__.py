"""Heterogeneous LoRA allocation strategies, one per module, behind one registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedhello.allocation import fedra, full  # noqa: F401  (registers the strategies)
from fedhello.allocation.base import (
    AllocationStrategy,
    register,
    strategy_class,
    strategy_names,
)

__all__ = ["AllocationStrategy", "build_strategy", "register", "strategy_class", "strategy_names"]


def build_strategy(
    name: str, num_layers: int, budgets: Sequence[int], seed: int, options: Any = None
) -> AllocationStrategy:
    """Instantiate the strategy registered under ``name``."""
    return strategy_class(name)(num_layers, budgets, seed, options)
