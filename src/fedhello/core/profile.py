"""A measured cost profile: what one local step costs for each lowest trained block and layer
count, on one model, batch shape, device and precision (pure python + numpy: no torch).

Backward stops at the lowest trained block, so a layer set's cost is set by its lowest block
``b = min(S)`` and, a little, by how many layers ``n = |S|`` it trains (each adds its LoRA
gradients, the optimizer's moments and the inputs its LoRA branch keeps for backward). The
profile holds one measured :class:`Cost` per ``(b, n)``, ``1 <= n <= L - b`` (21 entries for 6
blocks); ``fedhello.model.probe`` measures it, ``fedhello.store.profiles`` keeps it keyed by
everything it depends on.

An analytic model is fitted to it (:class:`AnalyticFit`: least squares, linear in the depth
``L - b`` and the count ``n``): it fills the entries a quick probe did not measure and
``fedhello calibrate`` prints it with its largest error, so one sees how far the simple model
is from the measurement. This is fedhello's one cost model: every limit in real units
(``clients.budget_kind``, a node's ``budget-memory-mb`` / ``budget-step-seconds``) is checked
against a profile measured on the model, batch shape, device and precision it applies to,
never against constants fitted once elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PROFILE_VERSION = 1


@dataclass(frozen=True)
class Cost:
    """One local step: training memory (MB: saved-for-backward peak + fp32 gradients + the
    optimizer's state, what ``train_memory_mb`` records per client), median step time (s)
    and, on an accelerator, the allocator's peak (MB, the frozen model included)."""

    memory_mb: float
    step_seconds: float
    device_peak_mb: float | None = None
    measured: bool = True  # False: filled in by the fitted analytic model


@dataclass(frozen=True)
class AnalyticFit:
    """``cost(b, n) = base + per_block * (L - b) + per_layer * n``, for memory and time."""

    memory: tuple[float, float, float]  # base, per block of depth, per trained layer (MB)
    seconds: tuple[float, float, float]
    memory_max_error: float  # largest relative error on the measured entries
    seconds_max_error: float

    def predict(self, lowest: int, count: int, num_layers: int) -> tuple[float, float]:
        x = (1.0, num_layers - lowest, count)
        return float(np.dot(self.memory, x)), float(np.dot(self.seconds, x))


def fit_analytic(table: Mapping[tuple[int, int], Cost], num_layers: int) -> AnalyticFit:
    """Least-squares fit of the linear model to the measured entries."""
    keys = [k for k, c in table.items() if c.measured]
    x = np.array([[1.0, num_layers - b, n] for b, n in keys])
    fits, errors = [], []
    for attr in ("memory_mb", "step_seconds"):
        y = np.array([getattr(table[k], attr) for k in keys])
        coef = (
            np.linalg.lstsq(x, y, rcond=None)[0] if len(keys) >= 3 else np.array([y.mean(), 0, 0])
        )
        pred = x @ coef
        errors.append(float(np.max(np.abs(pred - y) / np.maximum(np.abs(y), 1e-12))))
        fits.append(tuple(float(c) for c in coef))
    return AnalyticFit(fits[0], fits[1], errors[0], errors[1])  # type: ignore[arg-type]


@dataclass
class CostProfile:
    """The measured costs of one setting (``key``) plus the exact upload sizes.

    ``layer_upload_bytes[l]``: the fp32 LoRA tensors of block ``l``; ``head_upload_bytes``: the
    head, which every client sends. Uploads need no measurement: they are tensor sizes.
    """

    key: dict[str, Any]
    num_layers: int
    table: dict[tuple[int, int], Cost]
    layer_upload_bytes: list[int]
    head_upload_bytes: int
    probe_steps: int = 0
    fit: AnalyticFit | None = field(default=None)

    def __post_init__(self) -> None:
        if self.fit is None and self.table:
            self.fit = fit_analytic(self.table, self.num_layers)

    def cost(self, layers: Sequence[int]) -> Cost:
        """The predicted cost of one step training ``layers`` (non-empty)."""
        b, n = min(layers), len(layers)
        entry = self.table.get((b, n))
        if entry is not None:
            return entry
        if self.fit is None:
            raise KeyError(f"the profile has no entry for lowest block {b}, {n} layers")
        mem, sec = self.fit.predict(b, n, self.num_layers)
        return Cost(mem, sec, None, measured=False)

    def upload_bytes(self, layers: Sequence[int]) -> int:
        return self.head_upload_bytes + sum(self.layer_upload_bytes[i] for i in layers)

    def top(self, count: int = 1) -> Cost:
        """The cheapest placement of ``count`` layers: the top ones."""
        return self.cost(range(self.num_layers - count, self.num_layers))

    # ---- JSON -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PROFILE_VERSION,
            "key": self.key,
            "num_layers": self.num_layers,
            "probe_steps": self.probe_steps,
            "layer_upload_bytes": self.layer_upload_bytes,
            "head_upload_bytes": self.head_upload_bytes,
            "entries": [
                {"lowest": b, "count": n, **asdict(c)} for (b, n), c in sorted(self.table.items())
            ],
            "fit": None if self.fit is None else asdict(self.fit),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CostProfile:
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile version {data.get('version')!r}, expected {PROFILE_VERSION}")
        table = {
            (int(e["lowest"]), int(e["count"])): Cost(
                float(e["memory_mb"]),
                float(e["step_seconds"]),
                None if e.get("device_peak_mb") is None else float(e["device_peak_mb"]),
                bool(e.get("measured", True)),
            )
            for e in data["entries"]
        }
        return cls(
            key=dict(data["key"]),
            num_layers=int(data["num_layers"]),
            table=table,
            layer_upload_bytes=[int(x) for x in data["layer_upload_bytes"]],
            head_upload_bytes=int(data["head_upload_bytes"]),
            probe_steps=int(data.get("probe_steps", 0)),
        )
