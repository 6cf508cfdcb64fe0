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

``auto`` precision: bf16 where the hardware has it (CUDA with bf16 support, a CPU with native
bf16 instructions, AVX512-BF16 or AMX), fp16 with scaling on older CUDA GPUs, fp32 elsewhere
(a CPU without bf16 instructions emulates it, slower than fp32; MPS mixed precision is not
measured by fedhello, so it is left for the user to ask for).
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
        bf16 = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        if spec == "auto":
            if bf16:
                return "bf16", f"auto: {name} supports bf16"
            return "fp16", f"auto: {name} has no bf16; fp16 with gradient scaling"
        if spec == "bf16" and not bf16:
            raise ConfigError(
                f"train.precision = 'bf16': {name} does not support bf16; "
                "allowed on it: auto, fp32, fp16"
            )
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
        """Loss scaling, enabled for fp16 only (bf16 has fp32's exponent range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch on the device. On CPU the tensors are used as they are (no copy); to CUDA
        they go through pinned memory, asynchronously (the gathered batch is a fresh tensor,
        so pinning it costs one host copy and lets the transfer overlap the queue)."""
        if not self.on_accelerator:
            return dict(batch)
        pin = self.device.type == "cuda"
        return {
            k: (v.pin_memory() if pin else v).to(self.device, non_blocking=pin)
            for k, v in batch.items()
        }

    def place(self, model: torch.nn.Module, trainable: set[str]) -> torch.nn.Module:
        """Move ``model`` to the device; store the frozen parameters (every one not named in
        ``trainable``: the adapter keys) in ``base_precision``. The adapter stays fp32."""
        model.to(self.device)
        if self.base_precision != "fp32":
            low = DTYPES[self.base_precision]
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name not in trainable and param.is_floating_point():
                        param.data = param.data.to(low)
        return model

    def device_name(self) -> str:
        """The hardware, for keys of what was measured on it: ``cuda: NVIDIA H100 ...``."""
        if self.device.type == "cuda":
            return f"cuda: {torch.cuda.get_device_name(self.device)}"
        if self.device.type == "cpu":
            return f"cpu: {cpu_name()}"
        return self.device.type

    def synchronize(self) -> None:
        """Wait for the device's queue (timing a step on CUDA needs it; a no-op elsewhere)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_mb(self) -> float | None:
        """The allocator's peak since ``reset_peak_memory`` (CUDA); None where there is none."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
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
