"""The allocation section: which strategy decides each client's LoRA layers (or ranks),
with the strategy's own options validated against its declared model. Pure python + pydantic:
no torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from fedhello.core.allocation import (
    StrategyOptions,
    option_owners,
    strategy_class,
    strategy_names,
    strategy_options,
)
from fedhello.core.config.sections import Section
from fedhello.core.errors import ConfigError


class AllocationConfig(Section):
    """The allocation strategy and its options.

    Besides the keys below, the section holds the chosen strategy's own options (each
    strategy declares them as a typed model: ``fedhello.core.allocation.options``), written
    flat: ``shape``, ``sampler``, ``fisher-warmup`` ... ``cfg.allocation.options`` is that model,
    validated, every default filled in. A key no strategy declares is an error. A key that
    another strategy declares (``shape`` under ``fedra``) is kept but does not apply: the run
    log warns about it (``foreign_options``). One config file may serve several strategies (a
    comparison's base config, ``--set allocation.strategy=...`` on a file written for another
    strategy), and run folders written before options were typed hold every option.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    strategy: str = Field("fedra", description="allocation strategy name (fedhello plan --help)")
    proxy_examples: int = Field(
        256,
        ge=1,
        description="server proxy set for Fisher scores, held out of the training pool for "
        "every strategy (so that all strategies of a comparison see the same client shards)",
    )
    fisher_batch_size: int = Field(
        32, ge=1, description="proxy examples per batch when the server computes Fisher scores"
    )
    fit: Literal["auto", "repair", "strict", "off"] = Field(
        "auto",
        description="a layer set that exceeds its client's limit (in real units): repair "
        "(move its shallowest layers up, drop layers only if that is not enough), strict (stop "
        "with an error) or off (the paper's semantics: the budget only, not enforced); auto: "
        "repair with limits in real units, off with layer budgets",
    )
    client_model: Literal["full", "subnetwork"] = Field(
        "full",
        description="what a client runs: the full model (the paper's: backward stops at the "
        "lowest trained block, forward runs them all), or subnetwork (FedRA's own code: only "
        "its allocated blocks, in order, so the forward skips the others); layer strategies",
    )
    _options: StrategyOptions = PrivateAttr(default_factory=StrategyOptions)

    @field_validator("strategy")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in strategy_names():
            raise ValueError(f"unknown strategy; choose one of: {', '.join(strategy_names())}")
        return v

    @model_validator(mode="after")
    def _strategy_options(self) -> AllocationConfig:
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        owners = option_owners()
        unknown = [k for k in extra if k not in owners]
        if unknown:
            own = list(strategy_class(self.strategy).Options.model_fields)
            allowed = ", ".join([*type(self).model_fields, *own])
            raise ValueError(
                f"unknown key 'allocation.{unknown[0]}'; allowed with strategy "
                f"{self.strategy!r}: {allowed} (other strategies' options: "
                f"{', '.join(k for k in owners if k not in own)})"
            )
        fields = strategy_class(self.strategy).Options.model_fields
        try:
            self._options = strategy_options(
                self.strategy, {k: v for k, v in extra.items() if k in fields}
            )
            for key, value in extra.items():  # another strategy's option: still a valid value
                if key not in fields:
                    strategy_options(owners[key][0], {key: value})
        except ConfigError as err:
            raise ValueError(str(err)) from None
        extra.update(self._options.model_dump(mode="json"))  # every default spelled out
        return self

    @property
    def options(self) -> StrategyOptions:
        """The chosen strategy's options (typed, validated, with defaults)."""
        return self._options

    def foreign_options(self) -> list[str]:
        """Keys of this section that are options of other strategies, not of this one."""
        own = strategy_class(self.strategy).Options.model_fields
        return [k for k in self.__pydantic_extra__ or {} if k not in own]

    def foreign_note(self) -> str | None:
        """One line for the run log about the options that do not apply, or None."""
        foreign = self.foreign_options()
        if not foreign:
            return None
        owners = option_owners()
        listed = "; ".join(f"{k} (of {', '.join(owners[k])})" for k in foreign)
        return (
            f"allocation options that do not apply to strategy {self.strategy!r}, ignored: {listed}"
        )

    def without_foreign(self) -> dict[str, Any]:
        """This section as a dict with only the options that apply."""
        foreign = set(self.foreign_options())
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in foreign}
