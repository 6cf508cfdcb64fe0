"""The ``[federation]`` section: the rounds, how the server weighs the uploads and the
optimizer it steps with, evaluation and generation, and Flower's operational settings.

Forbids unknown keys like every section (``fedhello.core.config.sections.Section``). Pure
python + pydantic: no torch.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from fedhello.core.aggregation import Weighting
from fedhello.core.config.sections import Section
from fedhello.core.server_optimizers import OPTIMIZERS, OptimizerName, default_server_lr

# FedOpt's settings and the server optimizers that read each (Reddi et al. 2021: Adagrad
# keeps no second-moment decay)
FEDOPT_SETTINGS = {
    "server_beta1": ("fedadam", "fedyogi", "fedadagrad"),
    "server_beta2": ("fedadam", "fedyogi"),
    "server_tau": ("fedadam", "fedyogi", "fedadagrad"),
}


class FederationConfig(Section):
    """The rounds, how the server weighs the uploads (``weighting``) and moves the global
    state towards their means (``server_optimizer``: ``fedhello.core.server_optimizers``).

    Older configs still load: ``weighted = true`` / ``false`` is ``weighting = "shard"`` /
    ``"uniform"``; ``server_momentum > 0`` without ``server_optimizer`` is ``fedavgm``. An
    unset ``server_lr`` takes its optimizer's default (1.0 for fedavg and fedavgm, 0.1 for the
    adaptive ones), and the resolved config (a run's ``config.toml``) holds that value."""

    rounds: int = Field(15, ge=1, description="communication rounds")
    weighting: Weighting = Field(
        "shard",
        description="each client's weight in the per-tensor means: shard (the examples in its "
        "shard, FedAvg's n_k), uniform (1 each: the Fed-HeLLo authors' protocol) or "
        "examples-seen (the examples it trained on this round, local steps x batch size: "
        "uniform with fixed local steps, the work done with local epochs); replaces "
        "weighted (true: shard, false: uniform)",
    )
    server_optimizer: OptimizerName = Field(
        "fedavg",
        description="the server's step on the mean update delta of each tensor trained this "
        "round: fedavg (x += server_lr delta), fedavgm (momentum server_momentum), fedadam, "
        "fedyogi, fedadagrad (FedOpt, Reddi et al. 2021: server_beta1, server_beta2, "
        "server_tau); a tensor nobody trained keeps its value and its moments. Default: "
        "fedavgm where server_momentum > 0, else fedavg",
    )
    server_lr: float | None = Field(
        None,
        gt=0,
        description="server step size eta (default: 1.0 for fedavg and fedavgm, the average "
        "itself; 0.1 for fedadam, fedyogi and fedadagrad, Flower's)",
    )
    server_momentum: float = Field(
        0.0, ge=0, lt=1, description="fedavgm: momentum beta, v = beta v + delta (0: fedavg)"
    )
    server_beta1: float = Field(
        0.9, ge=0, lt=1, description="fedadam, fedyogi, fedadagrad: first-moment decay b1"
    )
    server_beta2: float = Field(
        0.99, ge=0, lt=1, description="fedadam, fedyogi: second-moment decay b2"
    )
    server_tau: float = Field(
        1e-3,
        gt=0,
        description="fedadam, fedyogi, fedadagrad: adaptivity tau in eta m / (sqrt(v) + tau); "
        "v starts at tau^2",
    )
    eval_every: int = Field(1, ge=1, description="evaluate the global model every N rounds")
    min_replies: int = Field(
        1,
        ge=1,
        description="fewest valid updates a round needs to move the model (1 under "
        "privacy, whose noise moves it every round)",
    )
    round_timeout: float = Field(
        600.0, gt=0, description="Flower: seconds to wait for the replies of a round"
    )
    node_wait: float = Field(
        300.0, gt=0, description="Flower: seconds to wait for the SuperNodes to connect"
    )
    eval_examples: int = Field(
        1000, ge=1, description="per-round evaluation on a fixed subset of test/validation"
    )
    generate_every: int = Field(
        0,
        ge=0,
        description="causal-lm: greedy generation on the generation subset every N rounds, "
        "scored by ROUGE-L and exact match (0: at the end only; it costs far more than the "
        "per-round loss and perplexity)",
    )
    generate_examples: int = Field(
        100,
        ge=1,
        description="causal-lm: how many test prompts (a fixed subset) are answered by greedy "
        "generation, each round it generates and at the end (also the zero-shot reference)",
    )
    max_new_tokens: int = Field(
        48, ge=1, description="causal-lm: most tokens a generated answer may have"
    )
    client_cpus: int = Field(
        0,
        ge=0,
        description="Flower simulation: CPU cores per virtual client (0: all cores, one "
        "client at a time; with a GPU share, cores // (GPUs / client_gpus), so that the GPU "
        "share limits how many run at once). Ray runs min(cores // client_cpus, "
        "GPUs // client_gpus) at once; the run log says how many",
    )
    client_gpus: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Flower simulation: GPU share per virtual client, e.g. 0.25 = four "
        "clients train on a GPU at once (with client_cpus 0 or at most cores / 4). Default: "
        "1 where train.device finds CUDA, else 0; 0 with train.device = cuda is refused (Ray "
        "hides the GPUs from a client that asks for none). A client sees its GPU as cuda:0",
    )

    @model_validator(mode="before")
    @classmethod
    def _older_keys(cls, data: Any) -> Any:
        """``weighted`` into ``weighting``; the optimizer and its step size where unset."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "weighted" in data:
            weighted = data.pop("weighted")
            if not isinstance(weighted, bool):
                raise ValueError(
                    f"federation.weighted = {weighted!r}: allowed: true (weighting = 'shard') "
                    "or false ('uniform'); better: federation.weighting"
                )
            meant = "shard" if weighted else "uniform"
            given = data.get("weighting")
            if given is not None and given != meant:
                raise ValueError(
                    f"federation.weighted = {str(weighted).lower()} (weighting = {meant!r}) "
                    f"contradicts federation.weighting = {given!r}: give only weighting "
                    "(examples-seen, shard or uniform)"
                )
            data["weighting"] = meant
        momentum = data.get("server_momentum", 0.0)
        if data.get("server_optimizer") is None:
            moving = isinstance(momentum, int | float) and momentum > 0
            data["server_optimizer"] = "fedavgm" if moving else "fedavg"
        if data.get("server_lr") is None and data["server_optimizer"] in OPTIMIZERS:
            data["server_lr"] = default_server_lr(data["server_optimizer"])
        return data

    @model_validator(mode="after")
    def _momentum_is_fedavgm_s(self) -> FederationConfig:
        if self.server_momentum > 0 and self.server_optimizer != "fedavgm":
            raise ValueError(
                f"federation.server_momentum = {self.server_momentum:g} with "
                f"federation.server_optimizer = {self.server_optimizer!r}: momentum is "
                "FedAvgM's; allowed: server_optimizer = 'fedavgm', or server_momentum = 0"
            )
        # FedOpt's settings are refused, not ignored, where the optimizer does not read them
        # (compared with the defaults, so a saved config that spells every default out loads)
        fields = type(self).model_fields
        unread = [
            name
            for name, readers in FEDOPT_SETTINGS.items()
            if self.server_optimizer not in readers and getattr(self, name) != fields[name].default
        ]
        if unread:
            readers = [o for o in OPTIMIZERS if all(o in FEDOPT_SETTINGS[n] for n in unread)]
            given = ", ".join(f"federation.{n} = {getattr(self, n):g}" for n in unread)
            them, defaults = (
                ("them", "their defaults") if len(unread) > 1 else ("it", "its default")
            )
            raise ValueError(
                f"{given} with federation.server_optimizer = {self.server_optimizer!r}, which "
                f"does not read {them}; allowed: server_optimizer = {' or '.join(readers)}, or "
                f"{defaults}"
            )
        return self

    @property
    def eta(self) -> float:
        """The server step size: ``server_lr``, or its optimizer's default where unset."""
        return (
            default_server_lr(self.server_optimizer) if self.server_lr is None else self.server_lr
        )
