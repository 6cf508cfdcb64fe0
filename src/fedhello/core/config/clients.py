"""The clients section: how many clients, how many train each round, and each one's budget
(the LoRA layers it may train: a tier's fraction of the layers, or a count) or its limit in
real units (MB of training memory, seconds per local step, MB of upload per round).
Pure python + pydantic: no torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fedhello.core.config.sections import Section

# What a tier value is, per budget kind: a fraction of the layers, or a limit in real units
# (then also what each ``clients.budgets`` entry is).
TIER_UNITS = {"layers": "a fraction of the LoRA layers", "memory-mb": "MB of training memory",
              "step-seconds": "seconds per local step"}  # fmt: skip
# The retired ``clients.tier_kind`` values and the budget kind that replaces each.
TIER_KIND_REPLACEMENTS = {"cost": "step-seconds", "memory": "memory-mb"}
# The default tiers: fractions of the layers (budget_kind = layers).
DEFAULT_TIERS = (0.5, 0.75, 1.0)


class ClientsConfig(Section):
    num_clients: int = Field(12, ge=1, description="K: number of clients")
    per_round: int = Field(6, ge=1, description="m: clients sampled per round")
    budget_kind: Literal["layers", "memory-mb", "step-seconds"] = Field(
        "layers",
        description="what tiers and budgets give: layers (the paper's budgets: a fraction of "
        "the LoRA layers per tier, or a count per client in budgets), or a limit in real "
        "units: memory-mb (training memory: saved activations, gradients and optimizer state) "
        "or step-seconds (time of one local step); limits are checked against the measured "
        "cost profile (fedhello calibrate), which turns each into a budget",
    )
    tiers: list[float] = Field(
        list(DEFAULT_TIERS),
        min_length=1,
        description="equal-size client tiers, each tier's value: a fraction of the LoRA "
        "layers (budget_kind = layers) or a limit in the unit of budget_kind",
    )
    budgets: list[int | float] | None = Field(
        None,
        description="per client, its budget (a layer count) or its limit (in the unit of "
        "budget_kind); overrides tiers; one per client",
    )
    upload_mb: list[float] | None = Field(
        None,
        description="optional upload limit per round, MB per tier (one per tier of "
        "clients.tiers, or with clients.budgets one per distinct budget, smallest first): caps "
        "how many LoRA layers a client of the tier may send",
    )

    @model_validator(mode="before")
    @classmethod
    def _retired_tier_kind(cls, data: Any) -> Any:
        """``clients.tier_kind`` is retired. Its ``cost`` and ``memory`` tiers were fractions of
        a fixed analytic cost (fitted once, on MiniLM-L6 on one CPU) turned into a layer count
        that held only if the layers sat at the top, and nothing checked it; ``budget_kind``
        limits are checked against the cost profile measured on the client's own model, device
        and precision. ``layers`` was the default and stays readable (every config and run
        folder written before says it), so old runs still load; the other two are an error
        naming what replaces them."""
        if not isinstance(data, dict) or "tier_kind" not in data:
            return data
        data = dict(data)
        kind = data.pop("tier_kind")
        if kind == "layers":
            return data
        replacement = TIER_KIND_REPLACEMENTS.get(str(kind))
        instead = (
            f'clients.budget_kind = "{replacement}" with clients.tiers in {TIER_UNITS[replacement]}'
            if replacement
            else 'clients.budget_kind = "memory-mb" or "step-seconds"'
        )
        raise ValueError(
            f"clients.tier_kind = {kind!r} is retired: give real limits with {instead}, checked "
            "against the cost profile measured on the client's device (fedhello calibrate); "
            "allowed for tier_kind: layers, or leave it out"
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
                    f"{TIER_UNITS[kind]} (budget_kind = {kind})"
                )
            if kind == "memory-mb" and self.budgets is None and self.tiers == list(DEFAULT_TIERS):
                # Refused now rather than after a cost profile is measured (minutes on a real
                # model). Only the default fractions: a tiny test model trains in under 1 MB,
                # so smaller limits alone are no mistake. Seconds per step of 0.5-1 s are
                # plausible limits, so step-seconds keeps them.
                raise ValueError(
                    f"clients.tiers = {self.tiers} with clients.budget_kind = 'memory-mb': the "
                    "tiers read as MB limits of training memory and are the default layer "
                    "fractions; allowed: MB limits, e.g. clients.tiers = [100, 150, 200] "
                    "(fedhello calibrate shows what each layer set needs)"
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
            if any(v <= 0 for v in self.budgets):  # layers: already refused above
                raise ValueError(
                    f"clients.budgets = {self.budgets}: every limit must be positive "
                    f"({TIER_UNITS[kind]})"
                )
        if self.upload_mb is not None:
            if self.budgets is None and len(self.upload_mb) != len(self.tiers):
                raise ValueError(
                    f"clients.upload_mb has {len(self.upload_mb)} entries: needs one per tier "
                    f"(clients.tiers has {len(self.tiers)})"
                )
            if any(u <= 0 for u in self.upload_mb):
                raise ValueError(f"clients.upload_mb = {self.upload_mb}: limits must be positive")
            distinct = None if self.budgets is None else len(set(self.budgets))
            if distinct is not None and distinct != len(self.upload_mb):
                # with per-client budgets a client's tier is its value's rank among them
                raise ValueError(
                    f"clients.upload_mb has {len(self.upload_mb)} entries with clients.budgets "
                    f"of {distinct} distinct values: needs one per distinct value (a client's "
                    "tier is its value's rank, smallest first)"
                )
        return self

    @property
    def real_limits(self) -> bool:
        """Whether tiers and budgets give limits in real units (budget_kind other than
        layers), checked against a cost profile and turned into budgets."""
        return self.budget_kind != "layers"
