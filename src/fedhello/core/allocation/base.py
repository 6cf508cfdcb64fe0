"""The allocation strategy interface and its registry.

A strategy answers one question per round: which layers does each sampled client train?
Strategies are pure python (numpy at most) so ``fedhello plan`` runs without torch. Every
optional capability is declared here with its default, so the engine asks a strategy, never
probes it: Fisher-based strategies say so with ``uses_fisher`` and receive the scores through
``observe_scores``; randomized ones report their ``expected_coverage``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from fedhello.core.aggregation import (
    AggregationReport,
    ClientUpdate,
    State,
    Weighting,
    aggregate_masked,
)
from fedhello.core.allocation.options import StrategyOptions
from fedhello.core.errors import ConfigError
from fedhello.core.hooks import HookSpec
from fedhello.core.layers import AllocationPlan, ClientAllocation, check_layers

_REGISTRY: dict[str, type[AllocationStrategy]] = {}


class AllocationStrategy(ABC):
    """Decides each round's heterogeneous LoRA allocation (HLA).

    ``budgets[c]`` is client ``c``'s budget: the number of layers it can afford (at least 1),
    and ``floors[c]`` the lowest block it may train (0 without a memory or time limit; with
    one, the lowest block from which any ``budgets[c]`` layers fit, see ``fedhello.core.fit``): a
    strategy chooses within ``[floor, L)`` (``window``). The strategy owns both (``set_budget``
    changes one client's, e.g. when a Flower node declares its own budget or limit).
    Every random draw comes from ``fedhello.core.seeds.generator(seed, Purpose.ALLOCATE,
    round, client)``. Subclasses set ``name`` (the config's ``allocation.strategy``), may set
    ``Options`` (a :class:`StrategyOptions` model) and implement ``layers_for``.
    """

    name: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    # True for strategies that allocate from the server's Fisher scores of the layers.
    uses_fisher: ClassVar[bool] = False
    # True for the rank methods: every client trains every layer at its own rank.
    rank_method: ClassVar[bool] = False
    # True for strategies that freeze A whatever lora.freeze_a says (FFA-LoRA's row).
    freezes_a: ClassVar[bool] = False

    def __init__(
        self,
        num_layers: int,
        budgets: Sequence[int],
        seed: int = 0,
        options: StrategyOptions | None = None,
    ) -> None:
        if num_layers < 1:
            raise ConfigError(f"num_layers = {num_layers}: allowed: at least 1")
        self.num_layers = num_layers
        self.budgets: list[int] = []
        for b in budgets:
            self.budgets.append(self._checked(len(self.budgets), b))
        self.floors: list[int] = [0] * len(self.budgets)
        self.max_rank: int | None = None  # the global adapter's rank (configure_adapter)
        self.factors = "AB"  # the LoRA factors clients train: "B" under FFA-LoRA
        self.seed = seed
        self.options = options if options is not None else self.Options()
        if not isinstance(self.options, self.Options):
            raise ConfigError(
                f"strategy {self.name!r} takes {self.Options.__name__}, "
                f"got {type(self.options).__name__}"
            )

    def _checked(self, client: int, budget: int) -> int:
        # A budget above num_layers affords every layer; strategies take min(budget, L).
        if int(budget) < 1:
            raise ConfigError(f"client {client}: budget of {budget} layers; allowed: at least 1")
        return int(budget)

    def set_budget(self, client: int, budget: int, floor: int = 0) -> None:
        """The budget of one client (a node that declares its own budget, or a limit that
        affords it): ``budget`` layers at or above block ``floor``."""
        if not 0 <= floor < self.num_layers:
            raise ConfigError(f"client {client}: floor {floor}; allowed: 0..{self.num_layers - 1}")
        self.budgets[client] = self._checked(client, budget)
        self.floors[client] = floor

    def configure_adapter(self, max_rank: int, freeze_a: bool = False) -> None:
        """The global adapter's rank (``lora.r``) and whether A is frozen (FFA-LoRA)."""
        if max_rank < 1:
            raise ConfigError(f"lora.r = {max_rank}; allowed: at least 1")
        self.max_rank = max_rank
        self.factors = "B" if freeze_a else "AB"

    def rank_for(self, round: int, client: int) -> int | None:
        """The rank ``client`` trains at in ``round``; None: the full rank (layer strategies)."""
        del round, client
        return None

    def window(self, client: int) -> tuple[int, int]:
        """``(n, floor)``: how many layers ``client`` trains, all in ``[floor, L)``."""
        floor = self.floors[client]
        return min(self.budgets[client], self.num_layers - floor), floor

    @abstractmethod
    def layers_for(self, round: int, client: int) -> Sequence[int]:
        """The layers ``client`` trains in ``round`` (may be empty: the client sits out)."""

    def allocate(self, round: int, clients: Sequence[int]) -> AllocationPlan:
        """The plan of one round for the sampled ``clients``."""
        allocs = tuple(
            ClientAllocation(
                c,
                self.budgets[c],
                check_layers(self.layers_for(round, c), self.num_layers),
                rank=self.rank_for(round, c),
                factors=self.factors,
            )
            for c in clients
        )
        return AllocationPlan(round=round, num_layers=self.num_layers, clients=allocs)

    def aggregate(
        self,
        global_state: State,
        updates: Sequence[ClientUpdate],
        layer_of: dict[str, int | None],
        weighting: Weighting,
    ) -> tuple[State, AggregationReport, dict[str, Any]]:
        """The new global state from the round's uploads (each client weighted as
        ``weighting``, ``federation.weighting``, says), the report of who was accepted, and
        what the method adds to the round's record. Default: masked per-layer FedAvg."""
        state, report = aggregate_masked(
            global_state, updates, layer_of, self.num_layers, weighting
        )
        return state, report, {}

    @classmethod
    def client_hooks(
        cls, options: StrategyOptions, client_model: str = "full"
    ) -> tuple[HookSpec, ...]:
        """What this method's clients do beyond training their spec, as plain data: the
        model layer runs each hook by name (``fedhello.model.hooks``). Default: nothing,
        except FedRA's own client model where ``allocation.client_model = "subnetwork"``
        (only the allocated blocks run). A method with a client side overrides this (HetLoRA:
        rank self-pruning) and keeps the parent's hooks."""
        del options
        return (HookSpec("subnetwork"),) if client_model == "subnetwork" else ()

    def target(self) -> list[float] | None:
        """Target share of layer-slots per layer (sums to 1), or None if there is no target."""
        return None

    def expected_coverage(self, round: int, clients: Sequence[int]) -> list[float] | None:
        """Expected number of clients per layer (randomized strategies), else None."""
        del round, clients
        return None

    # Fisher-based strategies (``uses_fisher = True``) override these four.
    def needs_scores(self, round: int) -> bool:
        """Whether the server must score the layers at the start of ``round``."""
        del round
        return False

    def observe_scores(self, round: int, scores: Sequence[float]) -> None:
        """Receive the layers' Fisher scores computed at the start of ``round``."""
        raise TypeError(f"strategy {self.name!r} does not use Fisher scores")

    def layer_scores(self) -> list[float] | None:
        """The latest Fisher scores, if the strategy has any."""
        return None

    def layer_probabilities(self, round: int) -> list[float] | None:
        """The per-layer probabilities a Fisher-based strategy allocates with in ``round``."""
        del round
        return None

    # Stateful strategies (Fisher scores) override these so a resumed run continues exactly.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def register(cls: type[AllocationStrategy]) -> type[AllocationStrategy]:
    """Class decorator adding a strategy to the registry under ``cls.name``."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute name = '...' to be registered")
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, StrategyOptions)):
        raise TypeError(f"{cls.__name__}.Options must subclass StrategyOptions")
    _REGISTRY[cls.name] = cls
    return cls


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def strategy_class(name: str) -> type[AllocationStrategy]:
    """The strategy registered as ``name``; ConfigError naming the allowed ones otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"allocation.strategy = {name!r}: unknown strategy; choose one of: "
            f"{', '.join(strategy_names())}"
        )
    return _REGISTRY[name]


def option_owners() -> dict[str, list[str]]:
    """Option name -> the strategies that declare it."""
    owners: dict[str, list[str]] = {}
    for name in strategy_names():
        for option in _REGISTRY[name].Options.model_fields:
            owners.setdefault(option, []).append(name)
    return owners
