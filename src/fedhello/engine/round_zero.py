"""FedNCM's round 0 kept: the fingerprint of what the class sums are computed from, and a
folder that keeps them between processes (``fedhello run/compare --cache-dir DIR``).

Round 0 (``train.head = "class-means"``) runs up to 4,096 examples of every client through the
frozen model: on two CPU cores about 330 s for 12 clients, about as long as the 10 rounds of
training that follow at the comparisons' budget. It depends on the data, the shards, the model,
the initial state and the arithmetic, never on the strategy. So a comparison's strategies of
one seed share it in memory (``DataCache.round_zero``), and with a cache folder so do later
processes: a comparison grown by more strategies, or another study on the same clients.

The fingerprint is of content, not of names, because a folder outlives the files a config
names: every parameter and buffer of the model (the frozen base included, after the state is
loaded; non-persistent buffers such as BERT's position ids too), the base model's config and
the adapter's, the exact input batches each client sums, and the arithmetic: the device and
the machine behind it (CPU model and instruction set, or the GPU and its CUDA and cuDNN
versions), precision, the determinism settings in force in the process, float32 matmul
precision, thread count, and the versions of torch, transformers, peft, numpy and fedhello's
numerics. It is of the content alone, never of the process that computes it (sets are sorted,
so Python's per-process string hashing cannot reorder one). On a CPU, and on a GPU in
deterministic mode, equal fingerprints compute bit-identical sums, so a run that reuses them
writes the metrics.jsonl it would have written (only round 0's seconds, timing, differ); on a
GPU without it a recomputation would itself differ by rounding.
A file that cannot be read or does not match is recomputed and rewritten, with a warning, and a
folder that cannot be written costs the reuse, not the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import transformers
from peft import PeftModel
from safetensors import safe_open
from safetensors.numpy import save_file

from fedhello.core.aggregation import State
from fedhello.core.heads import ClassSums
from fedhello.core.numerics import NUMERICS_VERSION
from fedhello.engine.experiment import DataCache, Experiment
from fedhello.model.accelerator import Accelerator, cpu_name
from fedhello.model.class_means import summed_rows
from fedhello.model.determinism import missing_settings
from fedhello.model.lora import set_state

logger = logging.getLogger(__name__)

KIND = "fedhello round-0 class sums"  # the files' metadata says what they are


def _tensor(h: Any, name: str, value: torch.Tensor | np.ndarray) -> None:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
    array = np.ascontiguousarray(array)
    h.update(f"{name}:{array.dtype}:{array.shape}|".encode())
    h.update(array.tobytes())


def machine_facts(acc: Accelerator) -> list[Any]:
    """What the arithmetic depends on beyond the config: the hardware's kernels and the
    process's numerical settings (the config's ``train.deterministic`` is a request; what is in
    force is ``missing_settings``)."""
    facts: list[Any] = [
        platform.machine(), cpu_name(), torch.backends.cpu.get_cpu_capability(),
        torch.get_num_threads(), torch.get_float32_matmul_precision(), missing_settings(),
    ]  # fmt: skip
    if acc.device.type == "cuda":
        facts += [
            torch.cuda.get_device_name(acc.device), torch.cuda.get_device_capability(acc.device),
            torch.version.cuda, torch.backends.cudnn.version(),
        ]  # fmt: skip
    return facts


def _canonical(value: Any) -> Any:
    """``json.dumps``'s fallback for the fingerprint's parts: a set as its sorted members (PEFT
    keeps ``target_modules`` as one, and ``str`` of a set of strings follows Python's string
    hashing, which ``PYTHONHASHSEED`` randomises per process: with ``str`` two processes
    fingerprinted one round 0 two ways and shared it only by chance), anything else as text."""
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return str(value)


def round_zero_key(exp: Experiment, state: State) -> str:
    """The fingerprint of FedNCM's round 0 of ``exp`` under ``state`` (the module docstring
    says what it covers). Loads ``state`` into the model, as round 0 does."""
    cfg, acc, model = exp.cfg, exp.accelerator, exp.model
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    adapters = getattr(model, "peft_config", {})
    config: Any = getattr(base, "config", None)  # a transformers PretrainedConfig
    h = hashlib.sha256()
    parts = [
        KIND, NUMERICS_VERSION, torch.__version__, transformers.__version__, peft.__version__,
        np.__version__, DataCache.key(cfg, exp.source, exp.task.name), exp.pooling,
        str(acc.device), acc.precision, acc.base_precision, cfg.train.eval_batch_size,
        cfg.run.seed, len(exp.shards), machine_facts(acc),
        None if config is None else config.to_json_string(),
        getattr(config, "_attn_implementation", None),
        {name: c.to_dict() for name, c in adapters.items()},
    ]  # fmt: skip
    h.update(json.dumps(parts, sort_keys=True, default=_canonical).encode())
    set_state(model, state)
    with torch.no_grad():  # every tensor the forward reads: base, adapters, head, buffers
        tensors = [*model.named_parameters(), *model.named_buffers()]
        for name, tensor in sorted(tensors, key=lambda item: item[0]):
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

    def load(self, key: str, clients: int, shape: tuple[int, int]) -> list[ClassSums] | None:
        """The sums stored under ``key``, or None (absent, unreadable or not matching): one
        entry for each of ``clients`` clients, in order, each ``shape`` (classes x features)."""
        path = self.path(key)
        try:
            if not path.is_file():
                return None
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("kind") != KIND or meta.get("fingerprint") != key:
                    raise ValueError("its metadata names another fingerprint")
                ids = json.loads(meta["clients"])
                if ids != list(range(clients)):
                    raise ValueError(f"it holds clients {ids}, not 0-{clients - 1}")
                out = [ClassSums(c, f.get_tensor(f"{c}.sums"), f.get_tensor(f"{c}.counts"))
                       for c in ids]  # fmt: skip
            for s in out:
                if (s.sums.dtype != np.float64 or s.counts.dtype != np.int64
                        or s.sums.shape != shape or s.counts.shape != shape[:1]):  # fmt: skip
                    raise ValueError(f"client {s.client}'s tensors have the wrong shape or type")
        except Exception as e:  # any damage (or a folder we may not read): compute it again
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
        except Exception as e:  # safetensors' own I/O error is no OSError
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            logger.warning("round 0: cannot keep the class sums in %s (%s)", self.folder, e)
