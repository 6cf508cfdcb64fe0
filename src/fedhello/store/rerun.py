"""What a rerun must reproduce: a run's records and summary, the machine's measurements aside.

The promise is "same config and seed, same ``metrics.jsonl``, timing aside" (on a CPU). This
module says once what "aside" means, for the tests that check determinism, resume and engine
equality, and for ``scripts/reask/same_metrics.py``, which checks a published cell against its
rerun (issue 28's done-means).

Aside are the values that measure the machine rather than the computation:

- wall and compute seconds: a client's ``seconds``, ``cpu_seconds`` and median
  ``step_seconds``, a round's ``round_seconds``, ``eval_seconds`` and ``fisher_seconds``, the
  summary's ``wall_seconds``, ``client_seconds`` and ``client_cpu_seconds``;
- resident and allocator memory: ``peak_memory_mb`` (the process's RSS peak, which depends on
  what else the process held) and ``device_peak_memory_mb``;
- in the summary only, its provenance: which code and model files computed it (``code``,
  ``model_source``) and the round a resumed run went on from (``resumed_at_round``).

Everything else is compared exactly, floats bit for bit as written, including
``train_memory_mb`` (saved tensors, gradients and optimizer state: a function of the
computation) and ``step_limit_seconds`` (a client's configured limit, not a measurement). The
names are listed, not matched by suffix: a per-class recall of WordNet's class ``noun.time``
is a metric, though its name ends in "time". And a dict keyed by the data's own names
(``DATA_KEYED``: recall per class label) is compared whole, so that a class named "seconds"
is not set aside either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedhello.store.runs import RunDir

# Keys, at any depth of a record or summary, whose values measure the machine.
MACHINE_FIELDS = frozenset({
    "seconds", "cpu_seconds", "step_seconds", "round_seconds", "eval_seconds", "fisher_seconds",
    "wall_seconds", "client_seconds", "client_cpu_seconds", "peak_memory_mb",
    "device_peak_memory_mb",
})  # fmt: skip
# Keys whose dict is keyed by the data's names (class labels), not by fedhello's fields.
DATA_KEYED = frozenset({"per_class_recall"})
# Top-level keys of summary.json that say which code computed it, not what it computed.
PROVENANCE_FIELDS = frozenset({"code", "model_source", "resumed_at_round"})


def without_machine(value: Any) -> Any:
    """``value`` (a record, a summary, a list of them) without its ``MACHINE_FIELDS``, at any
    depth: what two runs of the same config must hold equal."""
    if isinstance(value, dict):
        return {
            k: v if k in DATA_KEYED else without_machine(v)
            for k, v in value.items()
            if k not in MACHINE_FIELDS
        }
    if isinstance(value, list):
        return [without_machine(v) for v in value]
    return value


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """One line ``where.path: a != b`` for every leaf that differs between ``a`` and ``b``, a
    key present in only one, or lists of different lengths. Compares everything it is given:
    pass ``without_machine`` of each to set the machine's measurements aside."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{where}.{key}: only in {'the second' if key in b else 'the first'}")
            else:
                out += differences(a[key], b[key], f"{where}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items != {len(b)}"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def run_differences(first: Path, second: Path) -> tuple[list[str], bool]:
    """Every difference between two runs (folders, or their ``metrics.jsonl`` files), the
    machine's measurements aside: their records round by round (read as a resume reads them,
    ``RunDir.read_metrics``), and their ``summary.json`` when both are folders with one
    (provenance aside too). Returns the lines and whether the summaries were compared."""
    runs = [RunDir(p if p.is_dir() else p.parent) for p in (first, second)]
    a, b = (without_machine(run.read_metrics()) for run in runs)
    if len(a) != len(b):
        return [f"{len(a)} records != {len(b)}"], False
    found = differences(a, b, "records")
    both = first.is_dir() and second.is_dir() and all(r.summary_path.is_file() for r in runs)
    if both:
        x, y = (
            without_machine({k: v for k, v in json.loads(r.summary_path.read_text()).items()
                             if k not in PROVENANCE_FIELDS})
            for r in runs
        )  # fmt: skip
        found += differences(x, y, "summary")
    return found, both
