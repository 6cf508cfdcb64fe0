"""One question asked across comparisons: does a strategy beat the baseline, and where?
(``fedhello report DIR DIR ... --out OUT``: ``regimes.md``, ``regimes.csv``, ``regimes.png``.)

A regime is one comparison folder's partition: its budgets, model, rounds and split. Within a
regime the rows are ``paired.md``'s (per seed, a strategy's score minus the baseline's on the
same shards, sampled clients and batches; mean, sd, 95% t interval, seeds to settle, wins /
ties / losses). Across regimes nothing is pooled: the regimes are different questions, and a
pooled mean would weigh them by how many seeds each happened to run. Each row adds what a
reader needs beside the gap: both strategies' mean scores over the common seeds and how close
each gets to the regime's centralised reference (per seed, its score over the reference's of
the same seed, averaged; "-" unless every one of those seeds has a reference). The forest plot
shows every row's seeds, mean and interval against a line at 0.
"""

from __future__ import annotations

import csv
import logging
import statistics
from pathlib import Path
from typing import Any

from fedhello.core.errors import ConfigError, RunDirError
from fedhello.store.runs import check_folder
from fedhello.studies.paired import FINAL, csv_row, interval_text, paired_differences, settle_text
from fedhello.studies.plots import forest_plot
from fedhello.studies.results import CENTRALIZED, RunData, collect
from fedhello.studies.scores import Scoring, scoring_of

logger = logging.getLogger(__name__)


def _mean_over(runs: dict[int, RunData], seeds: list[int], key: str) -> float:
    return 100 * statistics.fmean(runs[s].summary[key] for s in seeds)


def _ratio(runs: dict[int, RunData], ref: dict[int, RunData], seeds: list[int], key: str) -> float:
    """Mean over ``seeds`` of score / the reference's score at that seed; nan unless every one
    of them has a reference that scored above 0 (a ratio over fewer seeds than the means
    beside it would not be comparable with them)."""
    if any(s not in ref or not ref[s].summary[key] for s in seeds):
        return float("nan")
    return statistics.fmean(runs[s].summary[key] / ref[s].summary[key] for s in seeds)


def regime_names(folders: list[Path]) -> list[str]:
    """Each folder's name in the table: the shortest trailing part of its path that no other
    folder shares (``recipe`` alone, ``results-skew/recipe`` beside ``results-default/recipe``).
    The same folder twice is refused: its rows would count twice."""
    resolved = [f.resolve() for f in folders]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            first = folders[resolved.index(path)]
            raise RunDirError(f"{str(folders[i])!r} is given twice (as {str(first)!r}); "
                              "allowed: each comparison folder once")  # fmt: skip
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(names)) == len(names):
            return names
        depth += 1


def _check_strategies(strategies: list[str], rows: list[dict[str, Any]], bases: set[str]) -> None:
    """Every wanted strategy has a row somewhere (a typo is refused, not silently dropped)."""
    missing = [s for s in strategies if s not in {r["strategy"] for r in rows}]
    if not missing:
        return
    as_base = [s for s in missing if s in bases]
    why = f"{', '.join(as_base)} is the baseline (it has no row of its own); " if as_base else ""
    raise ConfigError(f"--strategies {','.join(missing)}: not paired in these folders; {why}"
                      "allowed: strategies they compare, other than the baseline")  # fmt: skip


def regime_rows(
    folders: list[Path], baseline: str | None = None, strategies: list[str] | None = None
) -> tuple[list[dict[str, Any]], Scoring]:
    """Every folder's paired rows (only ``strategies``' when given), in folder order, each
    with its regime's name, both means and ratios to the centralised reference."""
    rows: list[dict[str, Any]] = []
    kinds: dict[str, Path] = {}
    bases: set[str] = set()
    scoring: Scoring | None = None
    for folder, name in zip(folders, regime_names(folders), strict=True):
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
        if not paired:
            logger.warning("%s adds no row: it holds no two strategies on common seeds", folder)
        cells: dict[tuple[str, str], dict[int, RunData]] = {}
        for r in runs:
            cells.setdefault((r.partition, r.strategy), {})[r.seed] = r
        ref = {r.seed: r for r in runs if r.is_reference and r.strategy == CENTRALIZED}
        for row in paired:
            bases.add(row["baseline"])
            if strategies and row["strategy"] not in strategies:
                continue
            mine = cells[(row["partition"], row["strategy"])]
            base = cells[(row["partition"], row["baseline"])]
            seeds = sorted(mine.keys() & base.keys())
            key = scoring.final
            rows.append({
                "regime": name, "folder": str(folder), **row,
                "strategy_mean": _mean_over(mine, seeds, key),
                "baseline_mean": _mean_over(base, seeds, key),
                "strategy_over_centralized": _ratio(mine, ref, seeds, key),
                "baseline_over_centralized": _ratio(base, ref, seeds, key),
            })  # fmt: skip
    if strategies:
        _check_strategies(strategies, rows, bases)
    if not rows:
        raise RunDirError("no folder holds two strategies on common seeds: nothing to pair; "
                          "allowed: comparison folders of two or more strategies")  # fmt: skip
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
        f"baseline on the seeds both finished (per seed in seed order): {FINAL[scoring.kind]}, "
        "in points; both means are over those seeds. Nothing is pooled across regimes. / "
        "centralised: per seed, the score over the centralised reference's of the same seed, "
        "averaged (- unless every one of those seeds has a reference in the folder). The "
        "other columns are paired.md's.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "regimes.md").write_text("\n".join(lines) + "\n")
    with open(out / "regimes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([csv_row(r) for r in rows])
    labels = [f"{r['regime']} {r['partition']}: {r['strategy']} - {r['baseline']} "
              f"(n={r['seeds']})" for r in rows]  # fmt: skip
    plot = forest_plot(rows, labels, out / "regimes.png", f"paired {label} differences by regime")
    return [out / "regimes.md", out / "regimes.csv", plot]


def write_regimes_report(
    folders: list[Path], out: Path, baseline: str | None = None,
    strategies: list[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The report across ``folders`` into ``out`` (checked before anything is written)."""
    check_folder(out, "--out")
    if out.resolve() in {f.resolve() for f in folders}:
        raise RunDirError(f"--out {str(out)!r} is one of the compared folders; allowed: a "
                          "folder of its own (a comparison's folder holds one)")  # fmt: skip
    rows, scoring = regime_rows(folders, baseline, strategies)
    files = write_regimes(rows, scoring, out)
    return {"rows": rows, "files": [str(p) for p in files]}
