"""What issue 28's and 31's line files still have to run, and about how long it would take.

    python scripts/reask/remaining.py scripts/reask/q1.txt scripts/reask/q2.txt

Run from the repository root (the lines' folders are relative to it). For every ``fedhello
compare`` line, in order: the cells its command names (partition x strategy x seed, and the
centralised reference of each seed) that no earlier line named, how many of them are
finished (``summary.json``, through the links the lines make), and an estimate of the rest:
per unfinished cell the median ``wall_seconds`` of the finished cells of its strategy in the
same folder, else of its folder, else of every finished cell. Round 0 (FedNCM's class sums,
about 6 minutes a seed and partition, cached per machine) is in a cell's wall seconds only
where the cache missed, and a cell that ran paused or beside a test suite took longer, so
this is a planning figure. Issue 27's single ``fedhello run`` lines are not counted. Reads
only; runs nothing.
"""

from __future__ import annotations

import itertools
import json
import shlex
import statistics
import sys
from pathlib import Path


def compare_args(line: str) -> dict[str, str] | None:
    """The options of a line's ``fedhello compare`` (None: the line runs no comparison)."""
    if line.startswith("#") or "fedhello compare" not in line:
        return None
    words = shlex.split(line[line.index("fedhello compare") :].split("&&")[0])
    return {w[2:]: v for w, v in itertools.pairwise(words) if w.startswith("--")}


def cells_of(args: dict[str, str]) -> list[Path]:
    """Every run folder the comparison names, the centralised reference's included."""
    runs, seeds = Path(args["out"]) / "runs", args["seeds"].split(",")
    named = [
        runs / part / name.replace(":", "-") / f"seed{s}"
        for part in args["partitions"].split(",")
        for name in args["strategies"].split(",")
        for s in seeds
    ]
    return named + [runs / "centralized" / f"seed{s}" for s in seeds]


def wall_seconds(cell: Path) -> float | None:
    summary = cell / "summary.json"
    return float(json.loads(summary.read_text())["wall_seconds"]) if summary.is_file() else None


def estimate(cell: Path, finished: dict[Path, float], fallback: float) -> float:
    """The median wall time of the finished cells most like ``cell``: its strategy's in its
    folder, else its folder's, else ``fallback``."""
    for near in (cell.parent, cell.parent.parent.parent):
        times = [t for c, t in finished.items() if near in c.parents]
        if times:
            return statistics.median(times)
    return fallback


def main(files: list[str]) -> int:
    lines = [(f, compare_args(x)) for f in files for x in Path(f).read_text().splitlines()]
    comparisons = [(f, a) for f, a in lines if a is not None]
    every = {c.resolve() for _, a in comparisons for c in cells_of(a)}
    finished = {c: t for c in every if (t := wall_seconds(c)) is not None}
    fallback = statistics.median(finished.values()) if finished else 0.0
    seen: set[Path] = set()
    total = 0.0
    for file, args in comparisons:
        new = [c for c in dict.fromkeys(c.resolve() for c in cells_of(args)) if c not in seen]
        seen.update(new)
        todo = [c for c in new if c not in finished]
        hours = sum(estimate(c, finished, fallback) for c in todo) / 3600
        total += hours
        out = Path(args["out"]).resolve()
        guess = todo and not any(out in c.parents for c in finished)
        print(
            f"{Path(file).stem} {out.name:16s} {args['strategies']} x "
            f"{args['partitions']} x seeds {args['seeds']}: {len(new) - len(todo)} of "
            f"{len(new)} new cells finished, ~{hours:.1f} h left"
            + (" (no cell of its folder finished: every cell's median)" if guess else "")
        )
    print(
        f"about {total:.1f} h of one core left in all ({len(finished)} cells finished); a "
        "folder's links made by a line not yet run count its linked cells again"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
