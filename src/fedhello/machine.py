"""What fedhello will use on this machine, and why: the facts behind ``fedhello env``.

Users paste its output into bug reports, so it says everything a run's behaviour depends on
that the config does not: library versions, the devices found and their memory, what the
config's ``train.device`` and ``train.precision`` resolve to here (and why), torch's threads,
and whether the config's model and data can be had without a network. It loads no model
and reads no dataset (it looks them up, and reads a local file's first rows to check its
columns), so it answers in seconds, offline.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from fedhello.core.config import Config
from fedhello.core.errors import DataError, UserError
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
        unchecked = check_columns_here(cfg, path)  # a run's first error about them, raised
        return str(path.resolve()) + (f" (columns not checked: {unchecked})" if unchecked else "")
    if not cfg.model.allow_download:
        load_tables(name, False)  # raises the one-line reason a run would give
    return f"hub: {name} (downloads allowed)"


HEAD_ROWS = 5  # what is read of a local file to know its columns


def check_columns_here(cfg: Config, path: Path) -> str | None:
    """A ``DataError`` naming the columns ``cfg`` reads that the local dataset at ``path``
    lacks, in the words a run's data loading would stop with: the task kind's input columns
    (the first missing one, as the kind checks them) and ``data.label_column``, in one line.
    A file that exists is not yet data a run can read: ``env`` said "available" for a file
    without the configured columns. Reads the header and first rows only (a saved dataset:
    memory-mapped, its rows unread), so ``env`` stays seconds on a large file. Returns why
    nothing was checked where nothing can be cheaply (the model's task kind unknown here, a
    .json array, parsed only whole); else None."""
    from fedhello.data.columns import check_column, column_names

    task = _task_kind(cfg)
    if task is None:
        return f"the task kind of model.name = {cfg.model.name!r} is unknown here"
    tables = _head_tables(cfg.data.name, path)
    if tables is None:
        return "a .json array is read whole; a .jsonl file is read by its first rows"
    missing: list[str] = []
    for table in tables.values():
        try:
            task.check_inputs(table, cfg.data)
        except DataError as err:
            missing.append(str(err))
            break  # the same words for every split
    data = cfg.data
    labelled = any(data.label_column in column_names(t) for t in tables.values())
    if labelled or getattr(task, "unlabelled_class", None) is None:  # labels are read
        for table in tables.values():
            try:
                check_column(table, data.label_column, "label", "label_column", data.name)
            except DataError as err:
                missing.append(str(err))
                break
    elif data.partition != "iid":  # one class: only an IID partition splits it
        missing.append(
            f"data.partition = {data.partition!r}: dataset {data.name!r} has no "
            f"data.label_column = {data.label_column!r} to split its examples by class; "
            "allowed: partition = 'iid', or label_column naming a category column"
        )
    if missing:
        raise DataError("; ".join(dict.fromkeys(missing)))
    return None


def _task_kind(cfg: Config) -> Any:
    """The task kind a run would read the data as (``model.task``, "auto" resolved from a
    local config.json or a known hub model), without the network; None where it is unknown."""
    from fedhello.model.source import KNOWN_HUB_SHAPES, model_shape, resolve_model_source
    from fedhello.tasks import AUTO, task_for

    try:
        source = resolve_model_source(cfg.model.name, cfg.model.allow_download)
        if (Path(source) / "config.json").is_file() or source in KNOWN_HUB_SHAPES:
            return task_for(model_shape(source, cfg.model.task)[0])
        return None if cfg.model.task == AUTO else task_for(cfg.model.task)
    except UserError:  # the model line says why
        return None


def _head_tables(name: str, path: Path) -> dict[str, Any] | None:
    """Split name -> the first rows of a local dataset, read as ``fedhello.data.loading``
    reads it whole (the same formats and parser settings); None for a .json array."""
    import pandas as pd

    from fedhello.data.loading import FILE_FORMATS, load_tables

    if path.is_dir():  # a saved dataset: memory-mapped, nothing read but its schema
        return load_tables(name, False)
    suffixes = [s for s in path.suffixes if s != ".gz"]
    fmt = FILE_FORMATS.get(suffixes[-1] if suffixes else "")
    lines = path.suffix != ".json" or path.name.endswith(".jsonl.gz")  # as loading decides
    if fmt is None:
        load_tables(name, False)  # raises the unknown file type's line, reading nothing
    if fmt == "json" and not lines:
        return None
    try:
        if fmt in ("csv", "tsv"):
            tsv = fmt == "tsv"
            head = pd.read_csv(
                path, sep="\t" if tsv else ",", quoting=3 if tsv else 0, nrows=HEAD_ROWS
            )
            return {"all": head}
        if fmt == "json":
            return {"all": pd.read_json(path, lines=True, nrows=HEAD_ROWS)}
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        return {"all": pd.DataFrame(columns=pq.read_schema(path).names)}
    except Exception as err:  # pandas and pyarrow raise many types for unreadable files
        raise DataError(f"data.name = {str(path)!r}: cannot read it as {fmt}: {err}") from None


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
