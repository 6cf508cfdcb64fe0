"""One client's report of a round: its upload and what training it cost, declared once.

``REPORT`` declares every field (name, type, unit, required or not, who measures it, how the
run's record rounds it). The training loop fills a ``ClientResult``; the Flower wire encodes
and decodes it from this declaration (``fedhello.engine.flower.report_wire``); the client entry
of ``metrics.jsonl`` is derived from it (``record_fields``, used by
``fedhello.engine.records.client_record``). A field added here travels and is recorded with no
other change.

``num_examples``, ``examples_seen`` and ``train_loss`` are the update's (``ClientUpdate``:
aggregation weighs and validates them); the rest are the result's own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fedhello.core.aggregation import ClientUpdate

Group = Literal["training", "device", "traffic"]


@dataclass(frozen=True)
class ReportField:
    """One field of a client's report.

    ``group`` places it in the client's record: what training did and cost on the host
    (``training``; the client's limits follow them), where it trained (``device``), and the
    bytes moved (``traffic``). ``measured_by`` the server: never sent (the server counts the
    bytes it sent and received). A ``required`` field missing from a reply makes the update
    rejected, naming it; ``default`` is the value an optional field takes when absent (and the
    placeholder a rejected report records for a missing required one). ``omit_none``: an
    optional field that only some precisions have is left out of the record where it has no
    value (so records of the other precisions keep their keys)."""

    name: str  # snake_case: the attribute and the record's key
    type: type[int] | type[float] | type[str]
    unit: str
    doc: str
    group: Group
    required: bool = True
    digits: int | None = None  # rounding in metrics.jsonl (None: as measured)
    measured_by: Literal["client", "server"] = "client"
    default: int | float | str | None = None
    omit_none: bool = False


MIB = "MiB (2**20 bytes)"

# In the order of the client's record in metrics.jsonl.
REPORT: tuple[ReportField, ...] = (
    ReportField("num_examples", int, "examples", "examples in the client's shard", "training",
                default=0),
    ReportField("steps", int, "steps", "local steps taken", "training", default=0),
    ReportField("skipped_steps", int, "steps", "fp16 only: local steps whose update the loss "
                "scaler skipped (gradients overflowed)", "training", required=False,
                omit_none=True),
    ReportField("examples_seen", int, "examples", "examples trained on this round: local "
                "steps x batch size (full batches, repeats counted)", "training", default=0),
    ReportField("train_loss", float, "nats", "mean task loss over the local steps whose "
                "loss is finite (no regulariser)", "training", default=math.nan),
    ReportField("trainable_params", int, "parameters", "parameters trained (the spec's LoRA "
                "tensors and the head)", "training", default=0),
    ReportField("seconds", float, "s", "wall time of the client's training", "training",
                digits=4, default=0.0),
    ReportField("peak_memory_mb", float, MIB, "process RSS peak while training", "training",
                digits=1, default=0.0),
    ReportField("train_memory_mb", float, MIB, "tensors saved for backward (peak step) + "
                "gradients + AdamW's moments", "training", digits=3, default=0.0),
    ReportField("step_seconds", float, "s", "median time of a local step", "training",
                digits=5, default=0.0),
    ReportField("cpu_seconds", float, "s", "CPU time the training process spent meanwhile, "
                "all its threads (a stopped or waiting process adds none, unlike wall time); "
                "optional, so that a node of an older fedhello is not rejected for lacking it",
                "training", required=False, digits=4, omit_none=True),
    ReportField("device_peak_memory_mb", float, MIB, "the accelerator allocator's peak "
                "(CUDA; on MPS the largest allocation sampled after each forward pass; none on "
                "a CPU)", "device", required=False, digits=1),
    ReportField("device", str, "", "the device it trained on", "device", default="unknown"),
    ReportField("precision", str, "", "the compute precision it trained in", "device",
                default="unknown"),
    ReportField("dp_clip_norm", float, "", "client-level DP, clipped on the client: the clip "
                "norm its whole update was clipped to", "training", required=False,
                omit_none=True),
    ReportField("unclipped", int, "", "client-level DP, clipped on the client: 1 if its update "
                "was within the clip norm, else 0 (the bit adaptive clipping counts)", "training",
                required=False, omit_none=True),
    ReportField("bytes_up", int, "bytes", "the upload's tensors", "traffic",
                measured_by="server", default=0),
    ReportField("bytes_down", int, "bytes", "the global tensors its spec needs", "traffic",
                measured_by="server", default=0),
)  # fmt: skip
SENT = tuple(f for f in REPORT if f.measured_by == "client")


@dataclass
class ClientResult:
    """What one client's local training produced: the update (upload, examples, loss) and the
    rest of ``REPORT``."""

    update: ClientUpdate
    seconds: float
    peak_memory_mb: float  # process RSS peak while this client trained
    train_memory_mb: float  # tensors saved for backward (peak step) + grads + AdamW state
    trainable_params: int
    bytes_up: int
    bytes_down: int
    steps: int
    device: str = "cpu"
    precision: str = "fp32"
    device_peak_memory_mb: float | None = None  # allocator peak (CUDA; MPS: sampled)
    step_seconds: float = 0.0  # median time of a local step (batch, forward, backward, update)
    cpu_seconds: float | None = None  # the process's CPU time while it trained (all threads)
    skipped_steps: int | None = None  # fp16: steps the loss scaler skipped; None otherwise
    dp_clip_norm: float | None = None  # DP clipped on the client: the norm it clipped to
    unclipped: int | None = None  # DP clipped on the client: 1 if within the norm, else 0

    @property
    def num_examples(self) -> int:
        return self.update.num_examples

    @property
    def examples_seen(self) -> int:
        return self.update.examples_seen

    @property
    def train_loss(self) -> float:
        return self.update.train_loss

    @classmethod
    def assemble(cls, values: Mapping[str, Any], update: Mapping[str, Any]) -> ClientResult:
        """A result from every ``REPORT`` field's value (the update's own go to the update,
        with its other fields ``update``: client, layers, tensors, rank, factors, ...)."""
        own = {f.name for f in dataclasses.fields(ClientUpdate)}
        upd = ClientUpdate(**update, **{k: v for k, v in values.items() if k in own})
        return cls(update=upd, **{k: v for k, v in values.items() if k not in own})


def record_fields(result: ClientResult, group: Group) -> dict[str, Any]:
    """The ``group``'s fields of ``result`` for the run's record, rounded as declared."""
    out: dict[str, Any] = {}
    for f in REPORT:
        if f.group == group:
            value = getattr(result, f.name)
            if value is None and f.omit_none:
                continue
            out[f.name] = value if f.digits is None or value is None else round(value, f.digits)
    return out
