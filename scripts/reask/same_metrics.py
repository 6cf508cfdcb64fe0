"""Whether two runs' ``metrics.jsonl`` hold the same metrics, timings and memory readings aside.

Issue 28 asks that a randomly chosen published cell rerun from its own ``config.toml`` give
identical metrics::

    cell=docs/results-v2/ordering/runs/dirichlet/fed-hello/seed1
    fedhello run $cell/config.toml --out /tmp/r
    python scripts/reask/same_metrics.py $cell /tmp/r

Every value of every round's record, and the two ``summary.json`` where both folders have one,
is compared exactly (floats as written, bit for bit), except what measures the machine or
names the code: ``fedhello.store.rerun`` says which (the same definition the tests' equality
checks use). Prints each difference (round, path, both values) and exits 1 if there is any,
0 if none.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedhello.store.rerun import run_differences


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: same_metrics.py RUN_A RUN_B (run folders or metrics.jsonl files)")
        return 2
    first, second = (Path(p) for p in argv)
    for path in (first, second):
        if not (path / "metrics.jsonl" if path.is_dir() else path).is_file():
            print(f"no metrics.jsonl at {path}: give two run folders or metrics.jsonl files")
            return 2
    found, summaries = run_differences(first, second)
    for line in found:
        print(line)
    print(
        f"the records{' and the summaries' if summaries else ''}: {len(found)} "
        "differences (timings, memory readings and provenance aside)"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
