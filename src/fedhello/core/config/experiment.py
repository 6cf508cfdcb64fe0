"""A whole experiment's config: the sections, the checks that span several of them, and
which settings decide a run's results (what makes a finished run reusable). Pure python +
pydantic: no torch.
"""

from __future__ import annotations

from typing import Any

import tomli_w
from pydantic import Field, model_validator

from fedhello.core.allocation import strategy_class
from fedhello.core.config.clients import ClientsConfig
from fedhello.core.config.federation import FederationConfig
from fedhello.core.config.privacy import PrivacyConfig
from fedhello.core.config.sections import (
    DataConfig,
    LoraSection,
    ModelConfig,
    RunConfig,
    Section,
)
from fedhello.core.config.strategy import AllocationConfig
from fedhello.core.config.training import TrainConfig


def outcome_differences(
    saved: Config, wanted: Config, resolved_elsewhere: tuple[str, ...] = ()
) -> list[str]:
    """``section.key (saved -> wanted)`` for every result-relevant setting that differs;
    ``resolved_elsewhere``: ``train`` keys the caller compares as resolved (the precisions)."""
    a, b = saved.outcome_dict(), wanted.outcome_dict()
    skip = {("train", key) for key in resolved_elsewhere}
    sections = list(dict.fromkeys([*b, *a]))  # [privacy] is written only where DP is on
    return [
        f"{section}.{key} ({a.get(section, {}).get(key)!r} -> {b.get(section, {}).get(key)!r})"
        for section in sections
        for key in sorted(set(a.get(section, {})) | set(b.get(section, {})))
        if a.get(section, {}).get(key) != b.get(section, {}).get(key) and (section, key) not in skip
    ]


# Settings that never change a run's results (see Config.outcome_dict).
OPERATIONAL: dict[str, tuple[str, ...]] = {
    "model": ("allow_download",),
    "train": ("device",),  # where, not what: the resolved precision is in the outcome
    "federation": ("round_timeout", "node_wait", "client_cpus", "client_gpus"),
    "run": ("name", "out_dir", "checkpoint_every", "keep_checkpoints", "profile_dir"),
}


# The partition settings a partition does not read (fedhello.data.partition).
UNUSED_BY_PARTITION: dict[str, tuple[str, ...]] = {
    "iid": ("dirichlet_alpha", "classes_per_client"),
    "pathological": ("dirichlet_alpha",),
    "dirichlet": ("classes_per_client",),
}


class Config(Section):
    """A whole experiment.

    The checks that depend on the task kind (``model.task`` with the data columns it reads)
    are the kind's own, one layer up: ``fedhello.tasks.check_config``, run by ``fedhello
    validate``, the API's functions and every engine's build.
    """

    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataConfig = Field(default_factory=DataConfig)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    allocation: AllocationConfig = Field(default_factory=AllocationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @model_validator(mode="before")
    @classmethod
    def _private_weighting(cls, data: Any) -> Any:
        """Under DP every client weighs the same (a sum of clipped updates over a count that
        depends on no data): an unset ``federation.weighting`` becomes ``uniform``, written so
        in the run's config; another one given is refused by ``_privacy_settings``."""
        if not isinstance(data, dict):
            return data
        privacy = data.get("privacy")
        if isinstance(privacy, dict) and privacy.get("noise_multiplier") is not None:
            fed = data.get("federation", {})
            if isinstance(fed, dict) and "weighting" not in fed and "weighted" not in fed:
                data = {**data, "federation": {**fed, "weighting": "uniform"}}
        return data

    @model_validator(mode="after")
    def _privacy_settings(self) -> Config:
        p = self.privacy
        if not p.enabled:
            return self
        name = self.allocation.strategy
        if self.federation.min_replies > 1:
            raise ValueError(
                f"federation.min_replies = {self.federation.min_replies} with privacy: under "
                "DP the noise moves the model every round whoever replied (a round held back "
                "would tell that few did); allowed: min_replies = 1 with privacy"
            )
        if strategy_class(name).rank_method:
            raise ValueError(
                f"privacy.noise_multiplier with allocation.strategy = {name!r}: a rank method's "
                "server does not average (HetLoRA weighs by sparsity, FlexLoRA re-factorises by "
                "SVD), so a sum of clipped updates with noise is not its aggregate; allowed: a "
                "layer strategy (fed-hello, fedra, deepest-fit, full, ...)"
            )
        if self.train.head == "class-means":
            raise ValueError(
                "privacy.noise_multiplier with train.head = 'class-means': round 0 uploads "
                "every client's class feature sums, a release the accountant does not cover; "
                "allowed: train.head = auto (the averaged head under DP), federated, frozen or "
                "local"
            )
        if self.federation.weighting != "uniform":
            raise ValueError(
                f"federation.weighting = {self.federation.weighting!r} with "
                "privacy.noise_multiplier: DP sums clipped updates with equal weights (a weight "
                "from a client's data would change the sensitivity); allowed: uniform"
            )
        n = self.clients.num_clients
        if p.delta is not None and p.delta > 1 / n:
            # delta bounds the chance the guarantee fails; above 1/N a mechanism that publishes
            # one whole site's data at random meets it (1/N is the usual ceiling, not a goal)
            raise ValueError(
                f"privacy.delta = {p.delta:g} with clients.num_clients = {n}: above 1/N = "
                f"{1 / n:.4g}, at which (epsilon, delta)-DP allows releasing a whole site's data; "
                "allowed: 0 < delta <= 1/num_clients (a deployment wants it well below)"
            )
        if p.target_epsilon is not None and p.noise_multiplier == 0:
            raise ValueError(
                f"privacy.target_epsilon = {p.target_epsilon:g} with noise_multiplier = 0: "
                "without noise epsilon is infinite; allowed: a positive noise_multiplier"
            )
        if p.clipping == "adaptive":
            count_noise = p.count_noise or self.clients.per_round / 20
            if p.noise_multiplier and 2 * count_noise <= p.noise_multiplier:
                given = (
                    f"privacy.count_noise = {count_noise:g}"
                    if p.count_noise
                    else f"privacy.count_noise (default clients.per_round / 20 = {count_noise:g})"
                )
                raise ValueError(
                    f"{given} with noise_multiplier = "
                    f"{p.noise_multiplier:g}: adaptive clipping needs 2 x count_noise > "
                    "noise_multiplier (the count's release takes part of the budget: Andrew et "
                    f"al. 2021); allowed: count_noise > {p.noise_multiplier / 2:g}, or clipping "
                    "= 'fixed'"
                )
        return self

    @model_validator(mode="after")
    def _reachable_min_replies(self) -> Config:
        f, c = self.federation, self.clients
        if f.min_replies > c.per_round:
            raise ValueError(
                f"federation.min_replies = {f.min_replies} with clients.per_round = "
                f"{c.per_round}: no round could reach it and the model would never move; "
                f"allowed: 1 to {c.per_round}"
            )
        return self

    @model_validator(mode="after")
    def _method_settings(self) -> Config:
        name = self.allocation.strategy
        cls = strategy_class(name)
        if cls.rank_method:
            c = self.clients
            if c.real_limits or c.upload_mb is not None:
                raise ValueError(
                    f"allocation.strategy = {name!r} with clients.budget_kind = "
                    f"{c.budget_kind!r}{' and clients.upload_mb' if c.upload_mb else ''}: "
                    "a rank method takes layer budgets (each tier's share of the layers becomes "
                    "its rank); allowed: budget_kind = layers without upload_mb"
                )
            if self.allocation.client_model != "full":
                raise ValueError(
                    f"allocation.client_model = {self.allocation.client_model!r} with the rank "
                    f"method {name!r}: its clients train every block; allowed: full"
                )
        if name == "flexlora" and self.lora.freeze_a:
            raise ValueError(
                "lora.freeze_a = true with allocation.strategy = 'flexlora': its server "
                "re-factorises A every round; allowed: false"
            )
        fed = self.federation
        if name == "flexlora" and (fed.server_optimizer != "fedavg" or fed.eta != 1.0):
            setting = (
                f"federation.server_optimizer = {fed.server_optimizer!r}"
                if fed.server_optimizer != "fedavg"
                else f"federation.server_lr = {fed.eta:g}"
            )
            raise ValueError(
                f"{setting} with allocation.strategy = 'flexlora': its server re-factorises "
                "every module by SVD every round, so the factors are fresh and a server step "
                "or moments over them mean nothing; allowed: server_optimizer = 'fedavg' with "
                "server_lr = 1"
            )
        limited = self.clients.real_limits or self.clients.upload_mb is not None
        if (self.lora.freeze_a or cls.freezes_a) and limited:
            raise ValueError(
                f"FFA-LoRA (allocation.strategy = {name!r}, lora.freeze_a = "
                f"{str(self.lora.freeze_a).lower()}) with limits in real units: cost profiles "
                "are measured with A and B trained; allowed: budget_kind = layers without "
                "upload_mb"
            )
        if self.allocation.client_model == "subnetwork" and self.clients.real_limits:
            raise ValueError(
                "allocation.client_model = 'subnetwork' with clients.budget_kind = "
                f"{self.clients.budget_kind!r}: cost profiles are measured on the full model; "
                "allowed: budget_kind = layers"
            )
        finetune = self.train.head_finetune_rounds
        if isinstance(finetune, int) and finetune > fed.rounds:
            raise ValueError(
                f"train.head_finetune_rounds = {self.train.head_finetune_rounds} with "
                f"federation.rounds = {fed.rounds}: it counts the last rounds; allowed: 0.."
                f"{fed.rounds}, or 'all'"
            )
        return self

    def run_name(self) -> str:
        if self.run.name:
            return self.run.name
        return f"{self.allocation.strategy}-{self.data.partition}-seed{self.run.seed}"

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_none=True)
        if not self.privacy.enabled:  # off: no section, so every config without DP reads alike
            data.pop("privacy")
        return data

    def to_toml(self) -> str:
        return tomli_w.dumps(_kebab(self.to_dict()))

    def outcome_dict(self) -> dict[str, Any]:
        """The settings a run's results depend on: what decides whether a run can be reused.

        Operational settings (where the run is written, how often it checkpoints, how long a
        Flower server waits) are left out, so a finished comparison stays reusable when one
        of their defaults changes or a user moves the output folder.
        """
        data = self.to_dict()
        data["allocation"] = self.allocation.without_foreign()
        for section, keys in OPERATIONAL.items():
            for key in keys:
                data[section].pop(key, None)
        # another partition's setting splits nothing: a comparison's centralised reference
        # (one client, iid) is the same run whatever the skew of the splits compared with it
        for key in UNUSED_BY_PARTITION[self.data.partition]:
            data["data"].pop(key, None)
        if not self.clients.real_limits and self.clients.upload_mb is None:
            data["allocation"].pop("fit", None)  # no limit to fit: every policy trains alike
        return data


def _kebab(d: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("_", "-"): _kebab(v) if isinstance(v, dict) else v for k, v in d.items()}
