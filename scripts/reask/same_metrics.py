"""Whether two runs' ``metrics.jsonl`` hold the same metrics, timings and memory readings aside.

Issue 28 asks that a randomly chosen published cell rerun from its own ``config.toml`` give
identical metrics::

    cell=docs/results-v2/ordering/runs/dirichlet/fed-hello/seed1
    fedhello run $cell/config.toml --out /tmp/r
    python scripts/reask/same_metrics.py $cell /tmp/r

Every value of every round's record is compared exactly (floats as written, bit for bit),
except those that measure the machine rather than the computation: wall and compute seconds,
and the process's resident memory (``peak_memory_mb``, which depends on what else the process
held). ``train_memory_mb`` (saved tensors, gradients and optimizer state) is compared: it is
a function of the computation. Prints each difference (round, path, both values) and exits 1
if there is any, 0 if none. Two run folders also have their ``summary.json`` compared (the
final model's whole-test metrics and per-class recall), its provenance aside (the commit and
model path that computed it, and where a run was resumed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# keys that measure the machine: any key ending in one of these
MACHINE_SUFFIXES = ("seconds", "peak_memory_mb", "elapsed", "timestamp", "time")
# summary.json's provenance: which code and model files computed it, not what they computed
PROVENANCE = {"code", "model_source", "computed_at", "resumed_at_round"}


def records(path: Path) -> list[dict[str, Any]]:
    """The records of a run folder's (or a file's) metrics.jsonl, one per line."""
    file = path / "metrics.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def differences(a: Any, b: Any, where: str) -> list[str]:
    """``where: a != b`` for every leaf that differs, machine measurements skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key.endswith(MACHINE_SUFFIXES):
                continue
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


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: same_metrics.py RUN_A RUN_B (run folders or metrics.jsonl files)")
        return 2
    first, second = (records(Path(p)) for p in argv)
    if len(first) != len(second):
        print(f"{len(first)} records != {len(second)}")
        return 1
    pairs = enumerate(zip(first, second, strict=True))
    found = [d for i, (x, y) in pairs for d in differences(x, y, f"record {i + 1}")]
    a, b = (Path(p) / "summary.json" for p in argv)
    if a.is_file() and b.is_file():
        summaries = [json.loads(a.read_text()), json.loads(b.read_text())]
        for summary in summaries:
            for key in PROVENANCE:
                summary.pop(key, None)
        found += differences(*summaries, "summary")
    for line in found:
        print(line)
    print(
        f"{len(first)} records{' and the summaries' if a.is_file() and b.is_file() else ''}: "
        f"{len(found)} differences (timings and resident memory aside)"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
