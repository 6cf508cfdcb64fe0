"""The allocation strategy interface and its registry.

A strategy answers one question per round: which layers does each sampled client train?
Strategies are pure python (numpy at most) so ``fedhello plan`` runs without torch. Those that
need model information (Fisher scores) receive it through ``observe_scores``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from fedhello.masks import AllocationPlan, ClientAllocation, check_layers

_REGISTRY: dict[str, type[AllocationStrategy]] = {}


class AllocationStrategy(ABC):
    """Decides each round's heterogeneous LoRA allocation (HLA).

    ``budgets[c]`` is the number of layers client ``c`` can afford (1..num_layers). Every
    random draw comes from ``fedhello.seeds.generator(seed, Purpose.ALLOCATE, round, client)``.
    """

    name: ClassVar[str]
    help: ClassVar[str]

    def __init__(self, num_layers: int, budgets: Sequence[int], seed: int, options: Any) -> None:
        self.num_layers = num_layers
        self.budgets = list(budgets)
        self.seed = seed
        self.options = options

    @abstractmethod
    def layers_for(self, round: int, client: int) -> Sequence[int]:
        """The layers ``client`` trains in ``round`` (may be empty: the client sits out)."""

    def allocate(self, round: int, clients: Sequence[int]) -> AllocationPlan:
        """The plan of one round for the sampled ``clients``."""
        allocs = tuple(
            ClientAllocation(
                c, self.budgets[c], check_layers(self.layers_for(round, c), self.num_layers)
            )
            for c in clients
        )
        return AllocationPlan(round=round, num_layers=self.num_layers, clients=allocs)

    def target(self) -> list[float] | None:
        """Target share of layer-slots per layer (sums to 1), or None if there is no target."""
        return None

    # Stateful strategies (Fisher scores) override these so a resumed run continues exactly.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def register(cls: type[AllocationStrategy]) -> type[AllocationStrategy]:
    """Class decorator adding a strategy to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def strategy_class(name: str) -> type[AllocationStrategy]:
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name]
