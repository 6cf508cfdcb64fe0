"""Round checkpoints: everything a resumed run needs to continue bit-identically.

A checkpoint of round r is two files under ``<run>/checkpoints/``:

    round-000r.safetensors   the global adapter + head, and the server optimizer's state
                             (``server/`` + its ``state_dict`` names: ``server/velocity/<t>``
                             for FedAvgM, ``server/m/<t>`` and ``server/v/<t>`` for FedOpt)
    round-000r.json          round, strategy state (Fisher scores), config hash, tensor hash,
                             numerics version (``fedhello.core.numerics``; none: version 1),
                             the machine the rounds ran on, and ``wall_seconds``: the run's
                             wall time up to this checkpoint over all its processes (a resumed
                             run's summary adds its own to it; none: written before it existed)

Both are written to a temporary name and renamed (atomic on POSIX); the JSON goes last and
holds the SHA-256 of the tensor file, so a half-written or truncated checkpoint is detected and
skipped in favour of the previous one. Client sampling, allocation draws, batch order and
dropout all derive from (seed, round, client), so no generator state needs saving.
Never pickle: safetensors and JSON only. Checkpoints written before the server optimizers
(FedAvgM's velocity under ``momentum/<t>``) load as ``velocity/<t>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedhello.core.errors import RunDirError
from fedhello.core.numerics import NUMERICS_VERSION, recorded_version

logger = logging.getLogger(__name__)

FORMAT = "fedhello-checkpoint-1"
SERVER_PREFIX = "server/"  # the server optimizer's state (fedhello.core.server_optimizers)
MOMENTUM_PREFIX = "momentum/"  # before the server optimizers: FedAvgM's velocity


@dataclass
class Checkpoint:
    round: int
    state: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]  # the server optimizer's ``state_dict``
    strategy_state: dict[str, Any]
    # what the rounds so far were computed on (``device``: its type; ``torch_threads``): a
    # resume elsewhere computes the next rounds with other arithmetic (empty: not recorded)
    machine: dict[str, Any] | None = None
    # the run's wall time up to this checkpoint, summed over the processes that ran it (None:
    # not recorded, a checkpoint written before 2026-12-08)
    wall_seconds: float | None = None


def config_hash(config_toml: str) -> str:
    return hashlib.sha256(config_toml.encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    folder: Path,
    round_: int,
    state: dict[str, np.ndarray],
    optimizer_state: dict[str, np.ndarray],
    strategy_state: dict[str, Any],
    cfg_hash: str,
    keep: int = 2,
    machine: dict[str, Any] | None = None,
    wall_seconds: float | None = None,
) -> Path:
    """Write the checkpoint of ``round_`` atomically (``optimizer_state``: the server
    optimizer's ``state_dict``; ``machine``: the device type and torch threads the rounds ran
    with; ``wall_seconds``: the run's wall time so far, over all its processes); keep the
    newest ``keep`` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"round-{round_:06d}"
    tensors = dict(state) | {SERVER_PREFIX + k: v for k, v in optimizer_state.items()}
    tmp = stem.with_suffix(".safetensors.tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    _fsync(tmp)
    os.replace(tmp, stem.with_suffix(".safetensors"))
    meta = {
        "format": FORMAT,
        "round": round_,
        "config_sha256": cfg_hash,
        "tensors_sha256": _sha256(stem.with_suffix(".safetensors")),
        "keys": sorted(state),
        "strategy_state": strategy_state,
        "numerics_version": NUMERICS_VERSION,
        **({"machine": machine} if machine else {}),
        **({"wall_seconds": round(wall_seconds, 2)} if wall_seconds is not None else {}),
    }
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, sort_keys=True))
    _fsync(tmp)
    os.replace(tmp, stem.with_suffix(".json"))
    for old in sorted(folder.glob("round-*.json"))[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return stem.with_suffix(".json")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_one(meta_path: Path, cfg_hash: str, keys: set[str]) -> Checkpoint:
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"unreadable metadata ({err})") from None
    if not isinstance(meta, dict):  # damaged: the previous checkpoint is used instead
        raise ValueError(f"metadata is a {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise RunDirError(f"checkpoint {str(meta_path)!r} is not a fedhello checkpoint")
    if meta.get("config_sha256") != cfg_hash or set(meta.get("keys", [])) != keys:
        raise RunDirError(
            f"checkpoint {str(meta_path)!r} belongs to another config or model "
            "(its config hash or tensor names differ from this run's)"
        )
    version = recorded_version(meta)
    if version != NUMERICS_VERSION:  # resuming would mix two arithmetics in one run
        raise RunDirError(
            f"checkpoint {str(meta_path)!r} was computed with numerics version {version}, this "
            f"fedhello computes version {NUMERICS_VERSION} (fedhello.core.numerics): start the "
            "run again with --overwrite"
        )
    tensors_path = meta_path.with_suffix(".safetensors")
    if not tensors_path.is_file() or _sha256(tensors_path) != meta.get("tensors_sha256"):
        raise ValueError("tensor file missing or its checksum differs (truncated?)")
    try:
        tensors = load_file(str(tensors_path))
    except SafetensorError as err:
        raise ValueError(f"tensor file unreadable ({err})") from None
    state = {k: v for k, v in tensors.items() if not k.startswith((SERVER_PREFIX, MOMENTUM_PREFIX))}
    server = {
        k.removeprefix(SERVER_PREFIX): v for k, v in tensors.items() if k.startswith(SERVER_PREFIX)
    }
    server |= {  # an older checkpoint: FedAvgM's velocity
        "velocity/" + k.removeprefix(MOMENTUM_PREFIX): v
        for k, v in tensors.items()
        if k.startswith(MOMENTUM_PREFIX)
    }
    round_ = meta.get("round")
    if not isinstance(round_, int) or isinstance(round_, bool):
        raise ValueError(f"metadata names no round ({round_!r})")
    # a timing only: a value that is no count of seconds is taken as unrecorded, not as damage
    wall = meta.get("wall_seconds")
    wall_seconds = None
    if isinstance(wall, (int, float)) and not isinstance(wall, bool) and 0 <= wall < math.inf:
        wall_seconds = float(wall)
    return Checkpoint(
        round_, state, server, meta.get("strategy_state", {}), meta.get("machine") or None,
        wall_seconds,
    )  # fmt: skip


def load_latest(folder: Path, cfg_hash: str, keys: set[str]) -> Checkpoint | None:
    """The newest intact checkpoint; broken ones are skipped with a warning. None if none
    exists; RunDirError if some exist but none is intact, or they belong to another run."""
    metas = sorted(folder.glob("round-*.json"), reverse=True) if folder.is_dir() else []
    broken = []
    for meta_path in metas:
        try:
            return _load_one(meta_path, cfg_hash, keys)
        except ValueError as err:
            logger.warning("skipping checkpoint %s: %s", meta_path.name, err)
            broken.append(meta_path.name)
    if broken:
        raise RunDirError(
            f"every checkpoint in {str(folder)!r} is damaged ({', '.join(broken)}): "
            "start the run again with --overwrite"
        )
    return None


def _newest_meta(folder: Path) -> dict[str, Any] | None:
    """The metadata of the newest readable checkpoint in ``folder`` (what a resumed run would
    continue from); None if there is none (a resume starts from round 1)."""
    metas = sorted(folder.glob("round-*.json"), reverse=True) if folder.is_dir() else []
    for meta_path in metas:
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(meta, dict):
            return meta
    return None


def checkpoint_numerics(folder: Path) -> int | None:
    """The numerics version of the newest readable checkpoint in ``folder``; None: none."""
    meta = _newest_meta(folder)
    return None if meta is None else recorded_version(meta)


def checkpoint_machine(folder: Path) -> dict[str, Any]:
    """The device type and torch threads the newest readable checkpoint's rounds ran with
    (empty: none, or written before 2026-12-07)."""
    meta = _newest_meta(folder)
    machine = None if meta is None else meta.get("machine")
    return dict(machine) if isinstance(machine, dict) else {}
