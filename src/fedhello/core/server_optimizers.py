"""Server optimizers: how the server moves the global state towards the round's averaged
uploads (numpy only).

Per tensor, ``delta = averaged - global``, the mean change of the clients that trained that
tensor this round (``fedhello.core.aggregation.weighted_mean``, weighted as
``federation.weighting`` says). Then, with ``eta = federation.server_lr``:

* ``fedavg``: ``x += eta delta`` (with eta = 1 the new state *is* the average, bit for bit);
* ``fedavgm`` (Hsu et al. 2019): ``v = beta v + delta``, ``x += eta v`` (beta =
  ``server_momentum``; with beta = 0 and eta = 1 the average itself, bit for bit);
* ``fedadagrad``, ``fedadam``, ``fedyogi`` (FedOpt, Reddi et al., ICLR 2021, Algorithm 2):
  ``m = b1 m + (1 - b1) delta``; FedAdagrad ``v = v + delta^2``; FedAdam
  ``v = b2 v + (1 - b2) delta^2``; FedYogi ``v = v - (1 - b2) delta^2 sign(v - delta^2)``;
  ``x += eta m / (sqrt(v) + tau)``.

Conventions (where Flower's FedOpt strategies and the paper differ, the paper wins):

* ``m`` starts at 0 and ``v`` at ``tau^2`` (the paper's Algorithm 2 asks ``v_{-1} >= tau^2``;
  Flower starts ``v`` at 0: a difference of ``tau^2``, 1e-6 at the default tau, per
  coordinate). No bias correction: Flower's FedAdam scales eta by
  ``sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))``, the paper and Flower's FedYogi and FedAdagrad do
  not. FedAdagrad keeps its first moment with ``b1`` as in Algorithm 2 (Flower's fixes
  ``b1 = 0``: set ``server_beta1 = 0`` for it). Defaults are Flower's: eta 0.1 for the
  adaptive optimizers (1.0 for fedavg and fedavgm), b1 0.9, b2 0.99, tau 1e-3.
* Only the tensors somebody trained this round move, and only their moments are updated: a
  tensor no accepted client trained keeps its value, and its ``m`` and ``v`` are *not*
  decayed (a layer trained every fifth round keeps the memory of its last update instead of
  forgetting it between its rounds; equivalently, each tensor's optimizer counts only the
  rounds it was trained in). Flower's strategies see every tensor every round and cannot
  tell; FedAvgM here did so before (``v`` of an untrained tensor was never decayed).
* The moments are float64 (the state they move stays in its own dtype); FedAvgM's velocity
  is kept in the tensor's dtype, as it always was, so its runs keep their arithmetic.

``state_dict`` / ``load_state_dict`` give the optimizer's state as flat named arrays
(``velocity/<tensor>``, ``m/<tensor>``, ``v/<tensor>``) for the round checkpoints
(``fedhello.store.checkpoint``), so a resumed run continues bit-identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol, get_args

import numpy as np

State = dict[str, np.ndarray]

OptimizerName = Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")


def default_server_lr(name: str) -> float:
    """``server_lr`` where the config leaves it unset: 1.0 for fedavg and fedavgm (the average
    itself), 0.1 for the adaptive optimizers (Flower's FedOpt default)."""
    return 0.1 if name in ADAPTIVE else 1.0


class ServerOptimizer:
    """The server's step from the global state to the next one; see the module docstring."""

    name: str = ""

    def __init__(self, server_lr: float) -> None:
        self.server_lr = server_lr

    def step(self, old: Mapping[str, np.ndarray], averaged: State, updated: set[str]) -> State:
        """The new global state: ``averaged`` (the round's per-tensor means, equal to ``old``
        where nobody trained) moved as the optimizer says on the ``updated`` tensors."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise ValueError(
                f"server optimizer {self.name!r} keeps no state, the checkpoint holds "
                f"{len(state)} arrays (e.g. {sorted(state)[0]!r})"
            )


class FedAvgM(ServerOptimizer):
    """``v = beta v + delta``, ``x += eta v``; beta = 0 is FedAvg with a server step size."""

    def __init__(self, server_lr: float = 1.0, beta: float = 0.0, name: str = "fedavgm") -> None:
        super().__init__(server_lr)
        self.name = name
        self.beta = beta
        self.velocity: State = {}

    def step(self, old: Mapping[str, np.ndarray], averaged: State, updated: set[str]) -> State:
        if self.beta == 0.0 and self.server_lr == 1.0:
            return averaged  # plain FedAvg: the average itself, bit for bit
        out = dict(averaged)
        for key in sorted(updated):  # as FedOpt: no order from string hashing
            delta = averaged[key] - old[key]
            v = self.velocity.get(key)
            v = delta if v is None else self.beta * v + delta
            if self.beta != 0.0:  # with beta = 0 the velocity is this round's delta: no state
                self.velocity[key] = v
            out[key] = (old[key] + self.server_lr * v).astype(old[key].dtype)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"velocity/{k}": v for k, v in self.velocity.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        velocity = _slot(state, "velocity", self.name)
        # an old checkpoint of beta = 0 holds the last delta as its velocity: no state
        self.velocity = velocity if self.beta != 0.0 else {}


class FedOpt(ServerOptimizer):
    """FedAdagrad, FedAdam, FedYogi (Reddi et al. 2021, Algorithm 2), per tensor."""

    def __init__(
        self, name: str, server_lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:  # fmt: skip
        if name not in ADAPTIVE:
            raise ValueError(f"unknown adaptive server optimizer {name!r}; allowed: {ADAPTIVE}")
        super().__init__(server_lr)
        self.name = name
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: State = {}
        self.v: State = {}

    def step(self, old: Mapping[str, np.ndarray], averaged: State, updated: set[str]) -> State:
        out = dict(averaged)
        b1, b2 = self.beta1, self.beta2
        for key in sorted(updated):
            x = old[key].astype(np.float64)
            delta = averaged[key].astype(np.float64) - x
            m = self.m.get(key, np.zeros_like(x))
            v = self.v.get(key, np.full_like(x, self.tau**2))
            m = b1 * m + (1.0 - b1) * delta
            d2 = delta * delta
            if self.name == "fedadagrad":
                v = v + d2
            elif self.name == "fedadam":
                v = b2 * v + (1.0 - b2) * d2
            else:  # fedyogi
                v = v - (1.0 - b2) * d2 * np.sign(v - d2)
            self.m[key], self.v[key] = m, v
            out[key] = (x + self.server_lr * m / (np.sqrt(v) + self.tau)).astype(old[key].dtype)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"m/{k}": a for k, a in self.m.items()} | {f"v/{k}": a for k, a in self.v.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.m = _slot(state, "m", self.name, also=("v",))
        self.v = _slot(state, "v", self.name, also=("m",))
        if self.m.keys() != self.v.keys():
            raise ValueError(f"server optimizer {self.name!r}: the checkpoint's m and v differ")


def _slot(
    state: Mapping[str, np.ndarray], slot: str, name: str, also: tuple[str, ...] = ()
) -> State:
    """The arrays of ``slot`` (``slot/<tensor>``) in a state dict; any other slot than
    ``slot`` and ``also`` is another optimizer's state: refused."""
    out: State = {}
    for key, value in state.items():
        head, sep, tensor = key.partition("/")
        if not sep or head not in (slot, *also):
            raise ValueError(
                f"server optimizer {name!r} cannot take the checkpoint's {key!r} (another "
                "optimizer's state)"
            )
        if head == slot:
            out[tensor] = np.array(value)  # a writable copy
    return out


def build_server_optimizer(
    name: str,
    server_lr: float | None = None,
    momentum: float = 0.0,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> ServerOptimizer:
    """The optimizer ``name`` (``server_lr`` None: its default, ``default_server_lr``)."""
    lr = default_server_lr(name) if server_lr is None else server_lr
    if name in ("fedavg", "fedavgm"):
        if name == "fedavg" and momentum:
            raise ValueError(f"fedavg takes no momentum (got {momentum}); use fedavgm")
        return FedAvgM(lr, momentum, name)
    if name in ADAPTIVE:
        return FedOpt(name, lr, beta1, beta2, tau)
    raise ValueError(f"unknown server optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


class ServerSettings(Protocol):
    """What ``server_optimizer`` reads of a config's ``federation`` section (a protocol, so
    that the config, which imports this module's names, is not imported back)."""

    @property
    def server_optimizer(self) -> str: ...
    @property
    def eta(self) -> float: ...
    @property
    def server_momentum(self) -> float: ...
    @property
    def server_beta1(self) -> float: ...
    @property
    def server_beta2(self) -> float: ...
    @property
    def server_tau(self) -> float: ...


def server_optimizer(fed: ServerSettings) -> ServerOptimizer:
    """The optimizer a config's ``federation`` section asks for."""
    return build_server_optimizer(
        fed.server_optimizer, fed.eta, fed.server_momentum, fed.server_beta1,
        fed.server_beta2, fed.server_tau,
    )  # fmt: skip
