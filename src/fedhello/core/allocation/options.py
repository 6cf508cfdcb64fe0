"""Typed options of the allocation strategies: each strategy owns one pydantic model.

A strategy declares ``Options = SomeOptions``; the config's ``[allocation]`` section is
validated against the chosen strategy's model (``fedhello.core.config``), and a strategy built
in Python takes the same fields as keyword arguments (``build_strategy("geometric", ...,
shape="uniform")``). Models are frozen: a strategy's options never change during a run.

The option blocks below are shared by composition, so that every strategy that draws from a
shape documents ``shape`` the same way.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

Shape = Literal["uniform", "triangle", "inverted-triangle", "bottleneck"]
SHAPES: tuple[str, ...] = get_args(Shape)


class StrategyOptions(BaseModel):
    """Options of a strategy that has none. Subclass it to give yours fields (with defaults
    and a ``description``: ``fedhello validate`` and the docs show them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ShapeOptions(StrategyOptions):
    shape: Shape = Field(
        "bottleneck",
        description="geometric shape of the collective allocation: how many clients train "
        "each layer (uniform, triangle: widest at the input, inverted-triangle: widest at the "
        "output, bottleneck: wide at both ends)",
    )


class SamplerOptions(StrategyOptions):
    sampler: Literal["exact", "numpy"] = Field(
        "exact",
        description="randomized draws: exact inclusion probabilities, or numpy's weighted draw "
        "without replacement (the authors', which flattens the shape)",
    )


class RandomShapeOptions(ShapeOptions, SamplerOptions):
    """A shape to draw from, and how to draw."""


class FisherOptions(RandomShapeOptions):
    """When the server refreshes the Fisher scores; the shape is the prior used before."""

    fisher_warmup: int = Field(2, ge=0, description="rounds before the first Fisher refresh")
    fisher_every: int = Field(5, ge=1, description="rounds between Fisher refreshes")


class HelloOptions(FisherOptions):
    """Fed-HeLLo's co-design: Fisher-score clusters mapped to levels, mixed with the prior."""

    fisher_levels: tuple[float, ...] = Field(
        (1 / 9, 2 / 27, 1 / 27),
        min_length=1,
        description="weight of the high, mid, low Fisher-score clusters (the authors' levels)",
    )
    fisher_mix: float = Field(
        1.0, ge=0, le=1, description="lam in p = lam * p_fisher + (1 - lam) * p_shape"
    )

    @field_validator("fisher_levels")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(x <= 0 for x in v):
            raise ValueError(f"levels must be positive, got {list(v)}")
        return v
