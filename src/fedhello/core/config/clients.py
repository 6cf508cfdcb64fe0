"""The clients section: how many clients, how many train each round, and each one's budget
(a share of the LoRA layers, or a real limit in MB of training memory or seconds per step).
Pure python + pydantic: no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedhello.core.config.sections import Section

BUDGET_UNITS = {"layers": "a fraction of the LoRA layers", "memory-mb": "MB of training memory",
                "step-seconds": "seconds per local step"}  # fmt: skip


class ClientsConfig(Section):
    num_clients: int = Field(12, ge=1, description="K: number of clients")
    per_round: int = Field(6, ge=1, description="m: clients sampled per round")
    budget_kind: Literal["layers", "memory-mb", "step-seconds"] = Field(
        "layers",
        description="unit of tiers and budgets: layers (the paper's: a fraction of the LoRA "
        "layers, or a count in budgets), memory-mb (training memory: saved activations, "
        "gradients and optimizer state) or step-seconds (time of one local step); the real "
        "units are checked against the measured cost profile (fedhello calibrate)",
    )
    tiers: list[float] = Field(
        [0.5, 0.75, 1.0],
        min_length=1,
        description="equal-size resource tiers, in the unit of budget_kind",
    )
    budgets: list[int | float] | None = Field(
        None,
        description="per-client budgets in the unit of budget_kind (overrides tiers; one per "
        "client; layers: a count)",
    )
    upload_mb: list[float] | None = Field(
        None,
        description="optional upload limit per round, MB per tier (one per tier): caps how "
        "many LoRA layers a client of the tier may send",
    )
    tier_kind: Literal["layers", "cost", "memory"] = Field(
        "layers",
        description="legacy, with budget_kind = layers: cost or memory tiers are fractions of "
        "the step time or activation memory of training every layer, turned into a layer "
        "count that fits only if the layers sit at the top (not enforced: use budget_kind)",
    )

    @model_validator(mode="after")
    def _counts(self) -> ClientsConfig:
        if self.per_round > self.num_clients:
            raise ValueError(
                f"clients.per_round = {self.per_round}: must be at most "
                f"clients.num_clients = {self.num_clients}"
            )
        kind = self.budget_kind
        if kind == "layers":
            bad = [t for t in self.tiers if not 0 < t <= 1]
            if bad:
                raise ValueError(
                    f"clients.tiers = {self.tiers}: {bad[0]:g} is not a fraction in (0, 1] of "
                    "the LoRA layers (budget_kind = layers); give real limits with "
                    "clients.budget_kind = memory-mb or step-seconds"
                )
        else:
            bad = [t for t in self.tiers if not t > 0]
            if bad:
                raise ValueError(
                    f"clients.tiers = {self.tiers}: {bad[0]:g} is not a positive limit in "
                    f"{BUDGET_UNITS[kind]} (budget_kind = {kind})"
                )
            if self.tier_kind != "layers":
                raise ValueError(
                    f"clients.tier_kind = {self.tier_kind!r} with clients.budget_kind = "
                    f"{kind!r}: tier_kind applies only to layer budgets; allowed: layers"
                )
        if self.budgets is not None:
            if len(self.budgets) != self.num_clients:
                raise ValueError(
                    f"clients.budgets has {len(self.budgets)} entries: needs one per client "
                    f"(clients.num_clients = {self.num_clients})"
                )
            if kind == "layers" and any(b != int(b) or b < 1 for b in self.budgets):
                raise ValueError(
                    f"clients.budgets = {self.budgets}: every layer budget must be a whole "
                    "number >= 1"
                )
            if any(b <= 0 for b in self.budgets):
                raise ValueError(
                    f"clients.budgets = {self.budgets}: every budget must be positive "
                    f"({BUDGET_UNITS[kind]})"
                )
        if self.upload_mb is not None:
            if len(self.upload_mb) != len(self.tiers):
                raise ValueError(
                    f"clients.upload_mb has {len(self.upload_mb)} entries: needs one per tier "
                    f"(clients.tiers has {len(self.tiers)})"
                )
            if any(u <= 0 for u in self.upload_mb):
                raise ValueError(f"clients.upload_mb = {self.upload_mb}: limits must be positive")
        return self

    @property
    def real_budgets(self) -> bool:
        """Whether budgets are limits in real units, checked against a cost profile."""
        return self.budget_kind != "layers"
