"""Where a model runs and in what precision: ``train.device`` and ``train.precision`` resolved
once, before anything is loaded, into an :class:`Accelerator` that every part of a run uses
(local training, evaluation, Fisher scoring, a site's evaluation, the merged export).

Mixed precision as PyTorch intends it: the forward pass runs under ``torch.autocast`` (matrix
products in bf16/fp16, reductions and losses in fp32, the backward follows the forward), while
the LoRA tensors, the head and the optimizer's state stay fp32, so the federated state, the
uploads and the checkpoints are fp32 whatever the precision. fp16 has a narrow exponent range,
so its gradients are scaled (``torch.amp.GradScaler``); bf16 has fp32's range and needs none.

The frozen base may also be *stored* in the compute precision (``train.base_precision``):
autocast casts an fp32 weight to bf16 on every forward, and since frozen weights do not
require grad its cast cache does not keep the copy, so storing them low halves the model's
memory and saves the casts. ``auto`` does so on an accelerator, where memory is the limit, and
keeps fp32 on a CPU, where it measured only 1-4% faster (docs/PERFORMANCE.md; the GPU side is
``make bench-gpu``'s to measure, not yet run).

``auto`` precision: bf16 where the hardware computes it natively (a CUDA GPU of compute
capability 8.0 or more, a CPU with AVX512-BF16 or AMX), fp16 with loss scaling on older CUDA
GPUs (a T4 or V100 runs bf16 emulated, slowly: ``torch.cuda.is_bf16_supported()`` counts that
as support, and asks about the current device rather than the configured one, so it is not the
question asked here), fp32 elsewhere (a CPU without bf16 instructions emulates it, slower than
fp32; MPS mixed precision is not measured by fedhello, so it is left for the user to ask for).
"""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedhello.core.config import DEVICE_FORM, Config
from fedhello.core.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_available() -> bool:
    return bool(torch.backends.mps.is_available())


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX512-BF16 or AMX tiles): torch 2.13 answers this
    only through ``torch.cpu``'s private probes, hence the guard."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def cuda_native_bf16(device: torch.device | int) -> bool:
    """Whether the CUDA device computes bf16 in hardware: compute capability 8.0 (Ampere) or
    more. Asked of ``device`` itself, so ``cuda:1`` is judged by its own capability."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def devices_found() -> list[str]:
    found = [f"cuda:{i}" for i in range(cuda_count())]
    return found + (["mps"] if mps_available() else []) + ["cpu"]


def resolve_device(spec: str) -> tuple[torch.device, str]:
    """The device ``train.device`` names, and why it was chosen; a missing one is a
    ConfigError naming what this machine has."""
    allowed = f"allowed on this machine: auto, {', '.join(devices_found())}"
    if spec == "auto":
        if cuda_count():
            return torch.device("cuda:0"), "auto: CUDA is available"
        if mps_available():
            return torch.device("mps"), "auto: Apple MPS is available"
        return torch.device("cpu"), "auto: no CUDA or MPS device"
    if spec.startswith("cuda"):
        count = cuda_count()
        if count == 0:
            raise ConfigError(
                f"train.device = {spec!r}: this machine has no CUDA device "
                f"(torch {torch.__version__}); {allowed}"
            )
        index = int(spec.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(
                f"train.device = {spec!r}: this machine has {count} CUDA device(s), "
                f"cuda:0..cuda:{count - 1}; {allowed}"
            )
        return torch.device("cuda", index), "as configured"
    if spec == "mps" and not mps_available():
        raise ConfigError(f"train.device = 'mps': Apple MPS is not available here; {allowed}")
    return torch.device(spec), "as configured"


def resolve_precision(spec: str, device: torch.device) -> tuple[str, str]:
    """The compute precision for ``device`` and why; an impossible pair is a ConfigError."""
    kind = device.type
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
        native = cuda_native_bf16(device)
        if spec == "auto":
            if native:
                return "bf16", f"auto: {name} has native bf16"
            return "fp16", f"auto: {name} has no native bf16; fp16 with loss scaling"
        if spec == "bf16" and not native:
            logger.warning("bf16 on %s, which has no native bf16: emulated, slow", name)
        return spec, "as configured"
    if kind == "cpu":
        if spec == "fp16":
            raise ConfigError(
                "train.precision = 'fp16' on the CPU: CPUs have no fast fp16 training path; "
                "allowed on cpu: auto, fp32, bf16"
            )
        if spec == "auto":
            if cpu_has_bf16():
                return "bf16", "auto: this CPU has native bf16 instructions (AVX512-BF16/AMX)"
            return "fp32", "auto: this CPU has no native bf16 instructions (bf16 would be slower)"
        if spec == "bf16" and not cpu_has_bf16():
            logger.warning("bf16 on a CPU without native bf16 instructions: emulated, slow")
        return spec, "as configured"
    if spec == "auto":  # mps
        return "fp32", "auto: mixed precision on MPS is not measured by fedhello (ask for it)"
    return spec, "as configured"


@dataclass(frozen=True)
class Accelerator:
    """A resolved device and precision, and the few operations that depend on them."""

    device: torch.device
    precision: str  # compute precision: fp32, bf16 or fp16
    base_precision: str  # storage of the frozen base weights: fp32 or ``precision``
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def on_accelerator(self) -> bool:
        return self.device.type != "cpu"

    def describe(self) -> dict[str, str]:
        """What the run log, ``summary.json`` and ``fedhello env`` show."""
        return {
            "device": str(self.device),
            "precision": self.precision,
            "base_precision": self.base_precision,
            "precision_reason": self.reason,
        }

    def autocast(self) -> Any:
        """The forward pass's context: autocast to the compute precision, or nothing in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, enabled for fp16 only (bf16 has fp32's exponent range); a fresh scale
        (2**16). A client's training carries one across rounds: ``step.LossScale``."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch on the device. On CPU the tensors are used as they are (no copy). To an
        accelerator a plain copy, not through pinned memory: pinning buys an asynchronous
        transfer that overlaps queued work, but every step is timed up to its queue having run
        (``ClientMeter.step``) and evaluation reads each batch's loss, so there is nothing to
        overlap; pinning would only add a host copy (gather, pin, transfer) and, on
        ``cuda:N``, open a context on the current device, ``cuda:0``."""
        if not self.on_accelerator:
            return dict(batch)
        return {k: v.to(self.device) for k, v in batch.items()}

    def place(self, model: torch.nn.Module, trainable: set[str]) -> torch.nn.Module:
        """Store the frozen parameters (every one not named in ``trainable``: the adapter
        keys) in ``base_precision``, then move ``model`` to the device: cast first, so that
        the device never holds the fp32 base (its peak is the low-precision model, not the
        fp32 one plus each cast). The adapter stays fp32."""
        if self.base_precision != "fp32":
            low = DTYPES[self.base_precision]
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name not in trainable and param.is_floating_point():
                        param.data = param.data.to(low)
        model.to(self.device)
        return model

    def device_name(self) -> str:
        """The hardware, for keys of what was measured on it: ``cuda: NVIDIA H100 ...``."""
        if self.device.type == "cuda":
            return f"cuda: {torch.cuda.get_device_name(self.device)}"
        if self.device.type == "cpu":
            return f"cpu: {cpu_name()}"
        return self.device.type

    def synchronize(self) -> None:
        """Wait for the device's queue: CUDA and MPS run asynchronously, so a step timed
        without it measures how fast work is queued (a no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_mb(self) -> float | None:
        """The allocator's peak since ``reset_peak_memory``: CUDA only; torch has no peak for
        MPS (``allocated_memory_mb`` is what can be sampled there), none on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return None

    def allocated_memory_mb(self) -> float | None:
        """Memory the device's allocator holds for tensors now (MiB): on MPS
        ``torch.mps.current_allocated_memory`` (the driver's total, caches included, is
        ``driver_allocated_memory``); on CUDA ``memory_allocated``; None on the CPU."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        if self.device.type == "mps":
            return torch.mps.current_allocated_memory() / 2**20
        return None


CPU_FP32 = Accelerator(torch.device("cpu"), "fp32", "fp32", "fp32 on the CPU")


def resolve(device: str = "auto", precision: str = "auto", base: str = "auto") -> Accelerator:
    """Resolve the three settings together; raises ConfigError before anything is loaded.
    (The config validates its own values; a SuperNode's node config arrives unchecked.)"""
    if not DEVICE_FORM.fullmatch(device):
        raise ConfigError(f"device = {device!r}: allowed: auto, cpu, cuda, cuda:N, mps")
    for key, value in (("precision", precision), ("base-precision", base)):
        if value not in ("auto", *DTYPES):
            raise ConfigError(f"{key} = {value!r}: allowed: auto, {', '.join(DTYPES)}")
    dev, dev_reason = resolve_device(device)
    prec, prec_reason = resolve_precision(precision, dev)
    if base == "auto":
        base = prec if dev.type != "cpu" else "fp32"
    elif base not in ("fp32", prec):
        raise ConfigError(
            f"train.base_precision = {base!r} with compute precision {prec!r}: "
            f"allowed: auto, fp32, {prec}"
        )
    reason = f"device {dev} ({dev_reason}); {prec} ({prec_reason})"
    return Accelerator(dev, prec, base, reason)


def accelerator_for(cfg: Config, recorded: Mapping[str, str] | None = None) -> Accelerator:
    """The accelerator of ``cfg`` on this machine. ``recorded``: the ``precision`` and
    ``base_precision`` a run being continued has run in so far; ``auto`` keeps them (a resumed
    run never switches precision half-way, e.g. on a machine where ``auto`` resolves otherwise),
    an explicit other value is refused."""
    t = cfg.train
    chosen: dict[str, str] = {"precision": t.precision, "base_precision": t.base_precision}
    for key, value in (recorded or {}).items():
        if chosen[key] == "auto":
            chosen[key] = value
        elif chosen[key] != value:
            raise ConfigError(
                f"train.{key} = {chosen[key]!r}, but this run has run in {value!r} so far; "
                f"allowed: {value!r} or auto"
            )
    return resolve(t.device, chosen["precision"], chosen["base_precision"])


def differs_from_recorded(cfg: Config, recorded: Mapping[str, str] | None) -> list[str]:
    """``key (recorded -> here)`` for each precision that a run's records and ``cfg`` resolved
    on this machine disagree on (what ``compare`` checks before reusing a run)."""
    if recorded is None:
        return []
    here = accelerator_for(cfg).describe()
    return [
        f"{key} ({recorded[key]!r} -> {here[key]!r}, train.{key} = {getattr(cfg.train, key)!r})"
        for key in recorded
        if recorded[key] != here[key]
    ]
