"""fedhello: federated LoRA fine-tuning with heterogeneous LoRA allocation (Fed-HeLLo).

The front door, loaded lazily so that ``import fedhello`` stays light (no torch until a
federation is built)::

    import fedhello
    cfg = fedhello.load_config("configs/default.toml", ["federation.rounds=2"])
    summary = fedhello.run(cfg, out="runs/try")          # the embedded engine
    plan = fedhello.plan(cfg, rounds=3)                  # who trains which layer
    profile = fedhello.calibrate(cfg)                    # what each layer depth costs here
    strategy = fedhello.build_strategy("geometric", 8, budgets=[2, 4, 6], shape="uniform")

Your own strategy: subclass ``AllocationStrategy``, give it a ``name`` (and, if it has
options, an ``Options`` model subclassing ``StrategyOptions``), decorate it with ``register``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "fedhello.api",  # the core's, plus the task kind's checks
    "Config": "fedhello.core.config",
    "run": "fedhello.api",
    "plan": "fedhello.api",
    "compare": "fedhello.api",
    "calibrate": "fedhello.api",
    "build_strategy": "fedhello.core.allocation",
    "AllocationStrategy": "fedhello.core.allocation",
    "StrategyOptions": "fedhello.core.allocation",
    "register": "fedhello.core.allocation",
    "strategy_names": "fedhello.core.allocation",
    "Observer": "fedhello.engine.core",
    "UserError": "fedhello.core.errors",
}
__all__ = [
    "AllocationStrategy",
    "Config",
    "Observer",
    "StrategyOptions",
    "UserError",
    "__version__",
    "build_strategy",
    "calibrate",
    "compare",
    "load_config",
    "plan",
    "register",
    "run",
    "strategy_names",
]

if TYPE_CHECKING:
    from fedhello.api import calibrate, compare, load_config, plan, run
    from fedhello.core.allocation import (
        AllocationStrategy,
        StrategyOptions,
        build_strategy,
        register,
        strategy_names,
    )
    from fedhello.core.config import Config
    from fedhello.core.errors import UserError
    from fedhello.engine.core import Observer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedhello' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
