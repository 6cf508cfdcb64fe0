"""The typed, validated experiment config: TOML file + dotted ``--set`` overrides.

Every field has a default and a help text, so ``fedhello run`` with no file runs the default
experiment. Unknown keys and bad values raise :class:`ConfigError` with one line naming the key,
the value and what is allowed. Pure python + pydantic: no torch.

The sections live in their own modules (``sections``: model, LoRA, data, run and the base;
``training``: local training; ``federation``: rounds, weighting, server optimizer, evaluation;
``privacy``: client-level differential privacy; ``clients``: tiers, budgets and limits;
``strategy``: the allocation strategy and its options), the whole experiment and its
cross-section checks in ``experiment``, reading files in ``loading``; this package re-exports
what the rest of fedhello uses.
"""

from fedhello.core.config.clients import TIER_UNITS, ClientsConfig
from fedhello.core.config.experiment import OPERATIONAL, Config, outcome_differences
from fedhello.core.config.federation import FederationConfig
from fedhello.core.config.loading import (
    LEGACY,
    apply_override,
    build_config,
    build_saved_config,
    format_error,
    load_config,
    load_saved_config,
    parse_value,
)
from fedhello.core.config.privacy import PrivacyConfig
from fedhello.core.config.sections import (
    DEVICE_FORM,
    DataConfig,
    LoraSection,
    ModelConfig,
    RunConfig,
    Section,
)
from fedhello.core.config.strategy import AllocationConfig
from fedhello.core.config.training import TrainConfig

__all__ = [
    "DEVICE_FORM",
    "LEGACY",
    "OPERATIONAL",
    "TIER_UNITS",
    "AllocationConfig",
    "ClientsConfig",
    "Config",
    "DataConfig",
    "FederationConfig",
    "LoraSection",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "Section",
    "TrainConfig",
    "apply_override",
    "build_config",
    "build_saved_config",
    "format_error",
    "load_config",
    "load_saved_config",
    "outcome_differences",
    "parse_value",
]
