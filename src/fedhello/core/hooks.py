"""What a client does beyond training its share of the adapter, as plain data.

A method's server side is its allocation strategy (``fedhello.core.allocation``); its client
side is a list of *client hooks* (HetLoRA: rank self-pruning; FedRA's own client model: the
subnetwork). The strategy declares them here as names and scalar parameters, without torch,
so that ``fedhello plan`` and the config stay light and a Flower node derives the same hooks
from the same config; the model layer (``fedhello.model.hooks``) maps each name to its code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

Scalar = bool | int | float | str


@dataclass(frozen=True)
class HookSpec:
    """One client hook: its registered ``name`` and the keyword ``params`` it is built with
    (``HookSpec("rank-pruning", {"penalty": 1e-3, "decay": 0.9, "min_rank": 1})``)."""

    name: str
    params: Mapping[str, Scalar] = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args})"
