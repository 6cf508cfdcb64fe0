"""A measured cost profile: what one local step costs for each lowest trained block and layer
count, on one model, batch shape, device and precision (pure python + numpy: no torch).

Backward stops at the lowest trained block, so a layer set's cost is set by its lowest block
``b = min(S)`` and, a little, by how many layers ``n = |S|`` it trains (each adds its LoRA
gradients, the optimizer's moments and the inputs its LoRA branch keeps for backward). The
profile holds one measured :class:`Cost` per ``(b, n)``, ``1 <= n <= L - b`` (21 entries for 6
blocks); ``fedhello.model.probe`` measures it, ``fedhello.store.profiles`` keeps it keyed by
everything it depends on.

Memory is checked in one of two measures (``CostProfile.memory_measure``): ``meter`` on a CPU,
the training memory a client records as ``train_memory_mb`` (saved-for-backward peak +
gradients + optimizer state, the frozen model not included), and ``allocator`` where the
device's allocator answers (CUDA; MPS sampled), its peak during a step as a client records it
in ``device_peak_memory_mb``: everything on the device, the frozen model, temporaries,
workspaces and the allocator's rounding included, which is what runs out.

A model of up to 12 blocks has every entry measured; a deeper one (a 30-block decoder: 465
entries) a lattice (:func:`probe_entries`), and an entry the probe did not measure is bounded
by the least measured entry at least as deep and as wide (a step costs more the deeper its
backward and the more layers it trains), so a limit checked against the profile holds. An
analytic model is fitted to it (:class:`AnalyticFit`: least squares, linear in the depth
``L - b`` and the count ``n``): it answers what no measured entry bounds, and
``fedhello calibrate`` prints it with its largest error, so one sees how far the simple model
is from the measurement. Step times are only as good as the machine was quiet:
``fedhello.core.coherence`` says whether a profile's times deserve storing. This is
fedhello's one cost model: every limit in real units (``clients.budget_kind``, a node's
``budget-memory-mb`` / ``budget-step-seconds``) is checked against a profile measured on the
model, batch shape, device and precision it applies to, never against constants fitted once
elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

# 2: step times are medians of several timed steps with their spread (``step_mad_seconds``),
# the memory measure is explicit, a profile whose times failed their checks says why. Version
# 1 files (a median of 3 steps, memory always the meter's) still load as a run's own copy, so a
# resumed run repairs as it did; the store measures them again (``fedhello.store.profiles``).
PROFILE_VERSION = 2
READABLE_VERSIONS = (1, 2)

MemoryMeasure = Literal["meter", "allocator"]


@dataclass(frozen=True)
class Cost:
    """One local step: training memory (MB: saved-for-backward peak + fp32 gradients + the
    optimizer's state, what ``train_memory_mb`` records per client), median step time (s),
    on an accelerator the allocator's peak (MB, the frozen model included, what
    ``device_peak_memory_mb`` records per client) and the timed steps' median absolute
    deviation from their median (s; None where not measured)."""

    memory_mb: float
    step_seconds: float
    device_peak_mb: float | None = None
    measured: bool = True  # False: filled in by the fitted analytic model
    step_mad_seconds: float | None = None


# Up to this many blocks the probe measures every (lowest block, count): 78 entries for 12.
FULL_TABLE_LAYERS = 12
LATTICE_ROWS = 6  # deeper models: lowest blocks measured beside the top placements


def probe_entries(num_layers: int) -> list[tuple[int, int]]:
    """The ``(lowest block, count)`` entries the probe measures.

    Every one up to ``FULL_TABLE_LAYERS`` blocks. A deeper model (a 30-block decoder has 465
    entries: hours of probing on a CPU) gets a lattice: every *top placement* ``(L - c, c)``
    (the layers a budget of ``c`` affords most cheaply, which the fit and ``deepest-fit``
    read), and at ``LATTICE_ROWS`` evenly spaced lowest blocks the counts 1, 2, 4, 8, ... up to
    all the blocks above it. Another entry is bounded by a measured one that costs at least
    as much (:meth:`CostProfile.cost`); 56 entries for 30 blocks."""
    L = num_layers
    if L <= FULL_TABLE_LAYERS:
        return [(b, n) for b in range(L) for n in range(1, L - b + 1)]
    entries = {(L - c, c) for c in range(1, L + 1)}
    for b in sorted({round(i * L / LATTICE_ROWS) for i in range(LATTICE_ROWS)}):
        n = 1
        while n < L - b:
            entries.add((b, n))
            n *= 2
    return sorted(entries)


def _lstsq(x: np.ndarray, y: np.ndarray) -> tuple[tuple[float, float, float], float]:
    """Least-squares coefficients (the mean alone under 3 points) and the largest relative
    error on the points."""
    coef = np.linalg.lstsq(x, y, rcond=None)[0] if len(y) >= 3 else np.array([y.mean(), 0, 0])
    error = float(np.max(np.abs(x @ coef - y) / np.maximum(np.abs(y), 1e-12)))
    return (float(coef[0]), float(coef[1]), float(coef[2])), error


@dataclass(frozen=True)
class AnalyticFit:
    """``cost(b, n) = base + per_block * (L - b) + per_layer * n``, for memory and time (and
    the allocator's peak where every measured entry has one)."""

    memory: tuple[float, float, float]  # base, per block of depth, per trained layer (MB)
    seconds: tuple[float, float, float]
    memory_max_error: float  # largest relative error on the measured entries
    seconds_max_error: float
    device_peak: tuple[float, float, float] | None = None
    device_peak_max_error: float | None = None

    def predict(self, lowest: int, count: int, num_layers: int) -> tuple[float, float]:
        x = (1.0, num_layers - lowest, count)
        return float(np.dot(self.memory, x)), float(np.dot(self.seconds, x))

    def predict_peak(self, lowest: int, count: int, num_layers: int) -> float | None:
        if self.device_peak is None:
            return None
        return float(np.dot(self.device_peak, (1.0, num_layers - lowest, count)))


def fit_analytic(table: Mapping[tuple[int, int], Cost], num_layers: int) -> AnalyticFit:
    """Least-squares fit of the linear model to the measured entries."""
    keys = [k for k, c in table.items() if c.measured]
    x = np.array([[1.0, num_layers - b, n] for b, n in keys])
    memory, memory_error = _lstsq(x, np.array([table[k].memory_mb for k in keys]))
    seconds, seconds_error = _lstsq(x, np.array([table[k].step_seconds for k in keys]))
    peaks = [table[k].device_peak_mb for k in keys]
    if not keys or any(p is None for p in peaks):
        return AnalyticFit(memory, seconds, memory_error, seconds_error)
    peak, peak_error = _lstsq(x, np.array(peaks, dtype=float))
    return AnalyticFit(memory, seconds, memory_error, seconds_error, peak, peak_error)


@dataclass
class CostProfile:
    """The measured costs of one setting (``key``) plus the exact upload sizes.

    ``layer_upload_bytes[l]``: the fp32 LoRA tensors of block ``l``; ``head_upload_bytes``: the
    head, which every client sends. Uploads need no measurement: they are tensor sizes.
    ``memory_measure``: what a memory limit is checked against (the module's docstring).
    ``step_time_problem``: why the step times are not to be trusted (too few steps, or
    incoherent twice: ``fedhello.core.coherence``); such a profile is never stored and no
    step-time limit is checked with it.
    """

    key: dict[str, Any]
    num_layers: int
    table: dict[tuple[int, int], Cost]
    layer_upload_bytes: list[int]
    head_upload_bytes: int
    probe_steps: int = 0
    fit: AnalyticFit | None = field(default=None)
    memory_measure: MemoryMeasure = "meter"
    warmup_steps: int = 0  # untimed steps before each entry's timed ones
    step_time_problem: str | None = None
    version: int = PROFILE_VERSION  # the format it was measured in

    def __post_init__(self) -> None:
        if self.fit is None and self.table:
            self.fit = fit_analytic(self.table, self.num_layers)

    def cost(self, layers: Sequence[int]) -> Cost:
        """The cost of one step training ``layers`` (non-empty): its measured entry, else a
        bound from the measured entries that cost at least as much (``dominating``), else the
        fitted analytic model's prediction."""
        b, n = min(layers), len(layers)
        entry = self.table.get((b, n))
        if entry is not None:
            return entry
        above = self.dominating(b, n)
        if above:
            # a step costs more the deeper its backward (lower b) and the more layers it
            # trains (larger n): each bound is the least of the entries at least as deep and
            # at least as wide, so a limit checked against it holds (a lattice probe's entries)
            peaks = [c.device_peak_mb for c in above]
            return Cost(
                min(c.memory_mb for c in above),
                min(c.step_seconds for c in above),
                None if any(p is None for p in peaks) else min(p for p in peaks if p is not None),
                measured=False,
            )
        if self.fit is None:
            raise KeyError(f"the profile has no entry for lowest block {b}, {n} layers")
        mem, sec = self.fit.predict(b, n, self.num_layers)
        return Cost(mem, sec, self.fit.predict_peak(b, n, self.num_layers), measured=False)

    def dominating(self, lowest: int, count: int) -> list[Cost]:
        """The measured entries ``(b, m)`` with ``b <= lowest`` and ``m >= count``: a backward
        at least as deep, at least as many layers trained."""
        return [c for (b, m), c in self.table.items() if c.measured and b <= lowest and m >= count]

    def memory_mb(self, layers: Sequence[int]) -> float:
        """The memory a limit on ``layers`` is checked against, in this profile's measure: the
        allocator's peak (``allocator``) or the training memory (``meter``)."""
        cost = self.cost(layers)
        if self.memory_measure == "allocator":
            if cost.device_peak_mb is None:
                raise KeyError(f"the profile has no allocator peak for layers {list(layers)}")
            return cost.device_peak_mb
        return cost.memory_mb

    @property
    def memory_phrase(self) -> str:
        """What its memory is, for one-line messages."""
        if self.memory_measure == "allocator":
            return "device memory (the allocator's peak, the frozen model included)"
        return "training memory"

    def upload_bytes(self, layers: Sequence[int]) -> int:
        return self.head_upload_bytes + sum(self.layer_upload_bytes[i] for i in layers)

    def top(self, count: int = 1) -> Cost:
        """The cheapest placement of ``count`` layers: the top ones."""
        return self.cost(range(self.num_layers - count, self.num_layers))

    # ---- JSON -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,  # the probe's that measured it
            "key": self.key,
            "num_layers": self.num_layers,
            "probe_steps": self.probe_steps,
            "warmup_steps": self.warmup_steps,
            "memory_measure": self.memory_measure,
            "step_time_problem": self.step_time_problem,
            "layer_upload_bytes": self.layer_upload_bytes,
            "head_upload_bytes": self.head_upload_bytes,
            "entries": [
                {"lowest": b, "count": n, **asdict(c)} for (b, n), c in sorted(self.table.items())
            ],
            "fit": None if self.fit is None else asdict(self.fit),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CostProfile:
        """A profile of any readable version; version 1 checks memory with the meter, as it
        did when it was measured."""
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"profile version {version!r}, expected one of {READABLE_VERSIONS}")
        table = {
            (int(e["lowest"]), int(e["count"])): Cost(
                float(e["memory_mb"]),
                float(e["step_seconds"]),
                _float_or_none(e.get("device_peak_mb")),
                bool(e.get("measured", True)),
                _float_or_none(e.get("step_mad_seconds")),
            )
            for e in data["entries"]
        }
        measure = data.get("memory_measure", "meter")
        if measure not in ("meter", "allocator"):
            raise ValueError(f"memory_measure {measure!r}, expected 'meter' or 'allocator'")
        problem = data.get("step_time_problem")
        return cls(
            key=dict(data["key"]),
            num_layers=int(data["num_layers"]),
            table=table,
            layer_upload_bytes=[int(x) for x in data["layer_upload_bytes"]],
            head_upload_bytes=int(data["head_upload_bytes"]),
            probe_steps=int(data.get("probe_steps", 0)),
            memory_measure=measure,
            warmup_steps=int(data.get("warmup_steps", 1 if version == 1 else 0)),
            step_time_problem=None if problem is None else str(problem),
            version=int(version),
        )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
