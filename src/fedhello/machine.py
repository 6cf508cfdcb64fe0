"""What fedhello will use on this machine, and why: the facts behind ``fedhello env``.

Users paste its output into bug reports, so it says everything a run's behaviour depends on
that the config does not: library versions, the devices found and their memory, what the
config's ``train.device`` and ``train.precision`` resolve to here (and why), torch's threads,
and whether the config's model and data can be had without a network. It loads no model
and reads no dataset (it only looks them up), so it answers in seconds, offline.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from fedhello.core.config import Config
from fedhello.core.errors import UserError
from fedhello.environment import find_program

PACKAGES = ("fedhello", "torch", "transformers", "peft", "flwr", "datasets", "numpy")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def devices() -> list[dict[str, Any]]:
    """Every device torch can use here, with its memory. ``bf16``: whether that device computes
    bf16 natively (a GPU by its own compute capability, 8.0 or more: what ``auto`` precision
    asks; older GPUs run bf16 only emulated)."""
    import psutil
    import torch

    from fedhello.model.accelerator import (
        cpu_has_bf16,
        cpu_name,
        cuda_count,
        cuda_native_bf16,
        mps_available,
    )

    found: list[dict[str, Any]] = []
    for i in range(cuda_count()):
        props = torch.cuda.get_device_properties(i)
        found.append({
            "device": f"cuda:{i}", "name": props.name,
            "memory_gb": round(props.total_memory / 2**30, 1),
            "bf16": cuda_native_bf16(i),
            "compute_capability": f"{props.major}.{props.minor}",
        })  # fmt: skip
    if mps_available():
        # the memory Metal recommends a process stay within (MPS shares the host's memory)
        recommended = torch.mps.recommended_max_memory()
        found.append({"device": "mps", "name": "Apple MPS",
                      "memory_gb": round(recommended / 2**30, 1)})  # fmt: skip
    found.append({
        "device": "cpu", "name": cpu_name(), "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "capability": torch.backends.cpu.get_cpu_capability(), "bf16": cpu_has_bf16(),
    })  # fmt: skip
    return found


def _availability(lookup: Any) -> dict[str, Any]:
    try:
        return {"available": True, "source": lookup()}
    except UserError as err:
        return {"available": False, "reason": str(err)}


def _data_source(cfg: Config) -> str:
    """Where ``data.name`` would be read from, without reading it."""
    from fedhello.data.loading import BUILTIN, load_tables

    name = cfg.data.name
    if name in BUILTIN:
        return f"built-in ({BUILTIN[name]})"
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if not cfg.model.allow_download:
        load_tables(name, False)  # raises the one-line reason a run would give
    return f"hub: {name} (downloads allowed)"


def describe(cfg: Config) -> dict[str, Any]:
    """The whole report as one JSON-ready dict."""
    import torch

    from fedhello.model.accelerator import accelerator_for
    from fedhello.model.source import resolve_model_source

    try:
        resolved: dict[str, Any] = accelerator_for(cfg).describe()
    except UserError as err:
        resolved = {"error": str(err)}
    resolved["configured"] = {
        "device": cfg.train.device,
        "precision": cfg.train.precision,
        "base_precision": cfg.train.base_precision,
    }
    return {
        "versions": {p: _version(p) for p in PACKAGES}
        | {
            "python": platform.python_version(),
            "torch_cuda": torch.version.cuda or "none (CPU build)",
        },
        "platform": platform.platform(),
        "devices": devices(),
        "resolved": resolved,
        "threads": {
            "torch": torch.get_num_threads(),
            "run.threads": cfg.run.threads or "torch's default",
            "cpu_cores": os.cpu_count(),
        },
        "offline": {
            "model": _availability(
                lambda: resolve_model_source(cfg.model.name, cfg.model.allow_download)
            ),
            "data": _availability(lambda: _data_source(cfg)),
            "hub_offline": os.environ.get("HF_HUB_OFFLINE") == "1",
        },
        # as ``fedhello run --engine flower`` finds it: beside this Python first, then on PATH
        "flwr": find_program("flwr"),
    }
