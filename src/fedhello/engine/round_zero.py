"""FedNCM's round 0 kept: the fingerprint of what the class sums are computed from, and a
folder that keeps them between processes (``fedhello run/compare --cache-dir DIR``).

Round 0 (``train.head = "class-means"``) runs up to 4,096 examples of every client through the
frozen model: on two CPU cores about 330 s for 12 clients, about as long as the 10 rounds of
training that follow at the comparisons' budget. It depends on the data, the shards, the model,
the initial state and the arithmetic, never on the strategy. So a comparison's strategies of
one seed share it in memory (``DataCache.round_zero``), and with a cache folder so do later
processes: a comparison grown by more strategies, or another study on the same clients.

The fingerprint is of content, not of names, because a folder outlives the files a config
names: every tensor of the model (the frozen base included, after the state is loaded), the
exact input batches each client sums, and the arithmetic (device, precision, deterministic
kernels, thread count, torch, transformers and fedhello's numerics version). Equal fingerprints
compute bit-identical sums, so a run that reuses them writes the metrics.jsonl it would have
written (only round 0's seconds, timing, differ). A file that cannot be read or does not match
its name is recomputed and rewritten, with a warning; it never stops a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from fedhello.core.aggregation import State
from fedhello.core.heads import ClassSums
from fedhello.core.numerics import NUMERICS_VERSION
from fedhello.engine.experiment import DataCache, Experiment
from fedhello.model.class_means import summed_rows
from fedhello.model.lora import set_state

logger = logging.getLogger(__name__)

KIND = "fedhello round-0 class sums"  # the files' metadata says what they are


def _tensor(h: Any, name: str, value: torch.Tensor | np.ndarray) -> None:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
    array = np.ascontiguousarray(array)
    h.update(f"{name}:{array.dtype}:{array.shape}|".encode())
    h.update(array.tobytes())


def round_zero_key(exp: Experiment, state: State) -> str:
    """The fingerprint of FedNCM's round 0 of ``exp`` under ``state`` (the module docstring
    says what it covers). Loads ``state`` into the model, as round 0 does."""
    cfg, acc = exp.cfg, exp.accelerator
    h = hashlib.sha256()
    parts = [
        KIND, NUMERICS_VERSION, torch.__version__, transformers.__version__,
        DataCache.key(cfg, exp.source, exp.task.name), exp.pooling, str(acc.device),
        acc.precision, acc.base_precision, cfg.train.deterministic, cfg.train.eval_batch_size,
        cfg.run.seed, torch.get_num_threads(), len(exp.shards),
    ]  # fmt: skip
    h.update(json.dumps(parts, sort_keys=True).encode())
    set_state(exp.model, state)
    with torch.no_grad():  # every tensor the forward reads: base, adapters and head
        for name, tensor in sorted(exp.model.state_dict().items()):
            # numpy has no bf16: its exact float32 values, the dtype in the name
            value = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
            _tensor(h, f"{name}:{tensor.dtype}", value)
    batch_size = cfg.train.eval_batch_size
    for client, rows in enumerate(exp.shards):  # the exact batches each client sums
        picked = summed_rows(rows, batch_size, cfg.run.seed, client)
        h.update(f"client {client}: {len(picked)} rows|".encode())
        for start in range(0, len(picked), batch_size):
            batch = exp.encoded.batch(picked[start : start + batch_size])
            for name in sorted(batch):
                _tensor(h, name, batch[name])
    return h.hexdigest()


class RoundZeroStore:
    """Class sums on disk, one safetensors file per fingerprint (never pickle). Writes go
    through a temporary file and a rename, so two processes computing the same round 0 at
    once (two queues of one study) leave one whole file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, key: str) -> Path:
        return self.folder / f"round0-{key}.safetensors"

    def load(self, key: str) -> list[ClassSums] | None:
        """The sums stored under ``key``, or None (absent, unreadable or not matching)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("kind") != KIND or meta.get("fingerprint") != key:
                    raise ValueError("its metadata names another fingerprint")
                clients = json.loads(meta["clients"])
                out = [
                    ClassSums(int(c), f.get_tensor(f"{c}.sums"), f.get_tensor(f"{c}.counts"))
                    for c in clients
                ]
            for s in out:
                if (s.sums.dtype != np.float64 or s.counts.dtype != np.int64 or s.sums.ndim != 2
                        or s.counts.shape != s.sums.shape[:1]):  # fmt: skip
                    raise ValueError(f"client {s.client}'s tensors have the wrong shape or type")
        except Exception as e:  # any damage means: compute it again
            logger.warning("round 0: %s cannot be reused (%s); computing it again", path, e)
            return None
        return out

    def save(self, key: str, sums: Sequence[ClassSums]) -> None:
        """Keep ``sums`` under ``key``. A folder that cannot be written costs the reuse, not
        the run: a warning."""
        tensors: dict[str, np.ndarray] = {}
        for s in sums:
            tensors[f"{s.client}.sums"] = np.ascontiguousarray(s.sums, dtype=np.float64)
            tensors[f"{s.client}.counts"] = np.ascontiguousarray(s.counts, dtype=np.int64)
        meta = {"kind": KIND, "fingerprint": key, "clients": json.dumps([s.client for s in sums])}
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            logger.warning("round 0: cannot keep the class sums in %s (%s)", self.folder, e)
