"""One question asked across comparisons: does a strategy beat the baseline, and where?
(``fedhello report DIR DIR ... --out OUT``: ``regimes.md``, ``regimes.csv``, ``regimes.png``.)

A regime is one comparison folder's partition: its budgets, model, rounds and split. Within a
regime the rows are ``paired.md``'s (per seed, a strategy's score minus the baseline's on the
same shards, sampled clients and batches; mean, sd, 95% t interval, seeds to settle, wins /
ties / losses). Across regimes nothing is pooled: the regimes are different questions, and a
pooled mean would weigh them by how many seeds each happened to run. Each row adds what a
reader needs beside the gap: both strategies' mean scores over the common seeds and how close
each gets to the regime's centralised reference (per seed, its score over the reference's of
the same seed, averaged; "-" where the folder has none). The forest plot shows every row's
seeds, mean and interval against a line at 0.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from fedhello.core.errors import ConfigError, RunDirError
from fedhello.store.runs import check_folder
from fedhello.studies.paired import csv_row, interval_text, paired_differences, settle_text
from fedhello.studies.plots import forest_plot
from fedhello.studies.results import CENTRALIZED, RunData, collect
from fedhello.studies.scores import Scoring, scoring_of


def _mean_over(runs: dict[int, RunData], seeds: list[int], key: str) -> float:
    return 100 * statistics.fmean(runs[s].summary[key] for s in seeds)


def _ratio(runs: dict[int, RunData], ref: dict[int, RunData], seeds: list[int], key: str) -> float:
    """Mean over the seeds with a reference of score / reference score (nan: none has one)."""
    shared = [s for s in seeds if s in ref]
    if not shared:
        return float("nan")
    return statistics.fmean(runs[s].summary[key] / ref[s].summary[key] for s in shared)


def regime_rows(
    folders: list[Path], baseline: str | None = None, strategies: list[str] | None = None
) -> tuple[list[dict[str, Any]], Scoring]:
    """Every folder's paired rows (only ``strategies``' when given), in folder order, each
    with its regime's name, both means and ratios to the centralised reference."""
    rows: list[dict[str, Any]] = []
    kinds: dict[str, Path] = {}
    scoring: Scoring | None = None
    for folder in folders:
        runs = collect(folder)
        scoring = scoring_of(runs)
        kinds.setdefault(scoring.kind, folder)
        if len(kinds) > 1:
            named = ", ".join(f"{k}: {str(f)!r}" for k, f in sorted(kinds.items()))
            raise RunDirError(f"the folders hold different task kinds ({named}); allowed: "
                              "comparisons of one kind, so that one score is paired")  # fmt: skip
        try:
            paired = paired_differences(runs, baseline, scoring)
        except ConfigError as e:
            raise ConfigError(f"{str(folder)!r}: {e}") from e
        cells: dict[tuple[str, str], dict[int, RunData]] = {}
        for r in runs:
            cells.setdefault((r.partition, r.strategy), {})[r.seed] = r
        ref = {r.seed: r for r in runs if r.is_reference and r.strategy == CENTRALIZED}
        for row in paired:
            if strategies and row["strategy"] not in strategies:
                continue
            mine, base = (
                cells[(row["partition"], row["strategy"])],
                cells[(row["partition"], row["baseline"])],
            )
            seeds = sorted(mine.keys() & base.keys())
            key = scoring.final
            rows.append({
                "regime": folder.name, "folder": str(folder), **row,
                "strategy_mean": _mean_over(mine, seeds, key),
                "baseline_mean": _mean_over(base, seeds, key),
                "strategy_over_centralized": _ratio(mine, ref, seeds, key),
                "baseline_over_centralized": _ratio(base, ref, seeds, key),
            })  # fmt: skip
    if strategies and not rows:
        raise ConfigError(f"--strategies {','.join(strategies)}: none is paired in these "
                          "folders; allowed: strategies they compare")  # fmt: skip
    assert scoring is not None  # folders is not empty
    return rows, scoring


def _num(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)  # nan: not measured


def write_regimes(rows: list[dict[str, Any]], scoring: Scoring, out: Path) -> list[Path]:
    """``regimes.md``, ``regimes.csv`` and ``regimes.png`` in ``out``; returns their paths."""
    label = scoring.label
    lines = [
        f"| regime | partition | strategy | vs | seeds | per seed ({label} points) | mean ± sd "
        f"| 95% CI | seeds to settle | W / T / L | strategy {label} | baseline {label} "
        "| / centralised (strategy, baseline) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = " ".join(f"{d:+.1f}" for d in r["final_diffs"])
        spread = f"{r['final_diff_mean']:+.1f}" + (
            f" ± {r['final_diff_std']:.1f}" if r["seeds"] > 1 else ""
        )
        ratios = (f"{_num(r['strategy_over_centralized'], '.2f')}, "
                  f"{_num(r['baseline_over_centralized'], '.2f')}")  # fmt: skip
        lines.append(
            f"| {r['regime']} | {r['partition']} | {r['strategy']} | {r['baseline']} | "
            f"{r['seeds']} | {per_seed} | {spread} | "
            f"{interval_text(r['final_diff_ci95_low'], r['final_diff_ci95_high'])} | "
            f"{settle_text(r)} | "
            f"{r['wins']} / {r['ties']} / {r['losses']} | {r['strategy_mean']:.1f} | "
            f"{r['baseline_mean']:.1f} | {ratios} |"
        )
    lines += [
        "",
        "One row per comparison folder (regime), partition and strategy, paired against the "
        "baseline on the seeds both finished: final score on the whole test split, in points. "
        "Nothing is pooled across regimes. / centralised: per seed, the score over the "
        "centralised reference's of the same seed, averaged (- where the folder has none). "
        "The other columns are paired.md's.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "regimes.md").write_text("\n".join(lines) + "\n")
    with open(out / "regimes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([csv_row(r) for r in rows])
    labels = [f"{r['regime']} {r['partition']}: {r['strategy']} - {r['baseline']}" for r in rows]
    plot = forest_plot(rows, labels, out / "regimes.png", f"paired {label} differences by regime")
    return [out / "regimes.md", out / "regimes.csv", plot]


def write_regimes_report(
    folders: list[Path], out: Path, baseline: str | None = None,
    strategies: list[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The report across ``folders`` into ``out`` (checked before anything is written)."""
    check_folder(out, "--out")
    rows, scoring = regime_rows(folders, baseline, strategies)
    files = write_regimes(rows, scoring, out)
    return {"rows": rows, "files": [str(p) for p in files]}
