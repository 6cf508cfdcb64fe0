"""Heterogeneous LoRA allocation strategies, one per module, behind one registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

# Importing the modules registers the strategies.
from fedhello.core.allocation import (  # noqa: F401
    deepest_fit,
    exclusive,
    fed_hello,
    fedra,
    ffa_lora,
    fisher,
    flexlora,
    full,
    geometric,
    hetlora,
    randomized_geometric,
    straggler,
)
from fedhello.core.allocation.base import (
    AllocationStrategy,
    option_owners,
    register,
    strategy_class,
    strategy_names,
)
from fedhello.core.allocation.options import SHAPES, StrategyOptions
from fedhello.core.errors import ConfigError

__all__ = [
    "SHAPES",
    "AllocationStrategy",
    "StrategyOptions",
    "build_strategy",
    "option_owners",
    "register",
    "strategy_class",
    "strategy_names",
    "strategy_options",
]


def strategy_options(name: str, values: dict[str, Any]) -> StrategyOptions:
    """``values`` validated against the options model of strategy ``name``; a ConfigError
    names the first bad option, the value and what is allowed."""
    cls = strategy_class(name)
    try:
        return cls.Options.model_validate(values)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(cls.Options.model_fields) or "none"
            raise ConfigError(
                f"strategy {name!r} has no option {key!r}; its options: {allowed}"
            ) from None
        raise ConfigError(
            f"allocation.{key} = {e.get('input')!r}: {e['msg']} (strategy {name!r})"
        ) from None


def build_strategy(
    name: str,
    num_layers: int,
    budgets: Sequence[int],
    seed: int = 0,
    options: StrategyOptions | None = None,
    **option_values: Any,
) -> AllocationStrategy:
    """The strategy registered under ``name``, for ``num_layers`` layers and per-client layer
    ``budgets``; its options as an ``Options`` instance or as keyword arguments:
    ``build_strategy("geometric", num_layers=8, budgets=[2, 4, 6], seed=0, shape="uniform")``.
    """
    if options is None:
        options = strategy_options(name, option_values)
    elif option_values:
        raise ConfigError("build_strategy: give options= or option keywords, not both")
    return strategy_class(name)(num_layers, budgets, seed, options)
