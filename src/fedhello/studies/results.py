"""A comparison's finished runs, read back from disk: what the report, the paired
differences and the plots all work from. Nothing here trains or needs torch.

A comparison folder holds ``runs/<partition>/<strategy>/seed<k>/`` and the centralised
reference ``runs/centralized/seed<k>/``; the reference is read back with the partition
``all`` (it trains on the whole pool, so it has no partition to pair on).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhello.core.config import load_config
from fedhello.core.errors import RunDirError
from fedhello.store.runs import RunDir

CENTRALIZED = "centralized"  # the reference's strategy name and folder
REFERENCE_PARTITION = "all"  # the partition the reference is reported under


@dataclass
class RunData:
    partition: str
    strategy: str
    seed: int
    records: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def is_reference(self) -> bool:
        """The centralised reference (no partition, no allocation)."""
        return self.partition == REFERENCE_PARTITION


@dataclass
class Row:
    partition: str
    strategy: str
    runs: list[RunData] = field(default_factory=list)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(root: Path) -> list[RunData]:
    """Every finished run under ``root`` (a comparison folder or one run directory)."""
    root = Path(root)
    allowed = "allowed: a finished run directory or a comparison folder"
    if not root.exists():
        raise RunDirError(f"{str(root)!r} does not exist; {allowed}")
    if not root.is_dir():
        raise RunDirError(f"{str(root)!r} is a file; {allowed}")
    if (root / "summary.json").is_file():
        paths = [root]
    else:
        # At fixed depths: ``**`` does not follow a symlinked folder (Python < 3.13), and a
        # comparison may link cells it shares with another, its reference most often
        found = [*root.glob("runs/*/seed*/summary.json"), *root.glob("runs/*/*/seed*/summary.json")]
        paths = sorted(p.parent for p in found)
    if not paths:
        raise RunDirError(f"{str(root)!r} holds no finished run (no summary.json)")
    runs = []
    for path in paths:
        run = RunDir(path)
        parts = path.relative_to(root).parts if path != root else ()
        summary = run.read_summary()
        if len(parts) >= 4:  # runs/<partition>/<strategy>/seed<k>
            partition, strategy = parts[1], parts[2]
        elif len(parts) == 3:  # runs/centralized/seed<k>
            partition, strategy = REFERENCE_PARTITION, parts[1]
        else:
            cfg = load_config(run.config_path)
            partition, strategy = cfg.data.partition, cfg.allocation.strategy
        seed = int(parts[-1].removeprefix("seed")) if parts else 0
        runs.append(RunData(partition, strategy, seed, run.read_metrics(), summary))
    return runs


def group(runs: list[RunData]) -> list[Row]:
    rows: dict[tuple[str, str], Row] = {}
    for r in runs:
        rows.setdefault((r.partition, r.strategy), Row(r.partition, r.strategy)).runs.append(r)
    return list(rows.values())
