"""Paired differences between strategies: how a comparison should be read.

Within a seed every strategy of a comparison sees the same shards, the same sampled clients and
the same batches; only the allocation differs. The per-seed difference of two strategies'
accuracies therefore cancels what the seed does to both (a lucky partition, an easy client
sequence), and its spread over seeds is the noise a reader must compare the gap with. A
difference whose sign flips between seeds is not a ranking, whatever the means say.

``paired.md`` / ``paired.csv`` hold, per partition and strategy, the mean and sample standard
deviation over the common seeds of ``accuracy(strategy) - accuracy(baseline)`` in points, for
the final whole-test-split accuracy and for the validation-selected round, the 95% confidence
interval of the mean final difference (Student's t over the seeds: a gap is established when
the interval excludes zero), and how many seeds the strategy won, tied or lost. A generative
comparison pairs ROUGE-L the same way (``fedhello.studies.scores``).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from fedhello.core.errors import ConfigError
from fedhello.studies.results import RunData, mean_std
from fedhello.studies.scores import ACCURACY, Scoring

logger = logging.getLogger(__name__)

# Preferred baselines, in order: the paper's main competitor, then the budget-ignoring bound.
DEFAULT_BASELINES = ("fedra", "full")


def pick_baseline(strategies: set[str], wanted: str | None = None) -> str:
    """``wanted`` if given and present, else the first default present, else the first name."""
    if wanted is not None and wanted in strategies:
        return wanted
    for name in DEFAULT_BASELINES:
        if name in strategies:
            return name
    return sorted(strategies)[0]


def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float]:
    """The ``level`` confidence interval of the mean of paired ``diffs`` (Student's t with
    n - 1 degrees of freedom); (nan, nan) below two seeds. Five seeds, mean 3, std 1.58:
    3 -+ 2.776 x 1.58 / sqrt(5) = [1.04, 4.96]."""
    from scipy.stats import t

    n = len(diffs)
    if n < 2:
        return float("nan"), float("nan")
    mean, std = mean_std(diffs)
    half = float(t.ppf(0.5 + level / 2, n - 1)) * std / n**0.5
    return mean - half, mean + half


SETTLE_CAP = 200  # seeds beyond which a gap is reported as out of reach ("> 200")


def seeds_to_settle(mean: float, std: float, level: float = 0.95) -> int | None:
    """The fewest seeds whose ``level`` interval would exclude zero if the per-seed differences
    kept this ``mean`` and ``std``: the smallest n >= 2 with t(n - 1) x std / sqrt(n) < |mean|
    (``SETTLE_CAP`` + 1 when none up to the cap; None for no gap, or an undefined std). A
    planning figure, not a result: five seeds' std is itself uncertain. Mean 0.3, std 0.9:
    2.028 x 0.9 / sqrt(37) = 0.3001 does not, 2.026 x 0.9 / sqrt(38) = 0.2958 does: 38."""
    from scipy.stats import t

    if mean == 0 or mean != mean or std != std:  # nan: fewer than 2 seeds
        return None
    for n in range(2, SETTLE_CAP + 1):
        if float(t.ppf(0.5 + level / 2, n - 1)) * std / n**0.5 < abs(mean):
            return n
    return SETTLE_CAP + 1


def paired_differences(
    runs: list[RunData], baseline: str | None = None, scoring: Scoring = ACCURACY
) -> list[dict[str, Any]]:
    """One row per (partition, strategy other than the baseline) with a common seed, on
    ``scoring``'s headline score (accuracy, or a generative task's ROUGE-L) in points."""
    by_cell: dict[tuple[str, str], dict[int, RunData]] = {}
    for r in runs:
        if not r.is_reference:  # the centralised reference has no partition to pair on
            by_cell.setdefault((r.partition, r.strategy), {})[r.seed] = r
    if baseline is not None and baseline not in {s for _, s in by_cell}:
        known = ", ".join(sorted({s for _, s in by_cell}))
        raise ConfigError(f"--baseline {baseline!r}: not a compared strategy; choose from: {known}")
    rows = []
    for partition in sorted({p for p, _ in by_cell}):
        names = {s for p, s in by_cell if p == partition}
        base_name = pick_baseline(names, baseline)
        base = by_cell[(partition, base_name)]
        for name in sorted(names - {base_name}):
            runs_s = by_cell[(partition, name)]
            seeds = sorted(runs_s.keys() & base.keys())
            if not seeds:
                logger.warning(
                    "%s on %s has no seed in common with %s (%s against %s): not paired",
                    name, partition, base_name, sorted(runs_s), sorted(base),
                )  # fmt: skip
                continue
            if set(runs_s) != set(base):
                logger.warning(
                    "%s on %s is paired with %s on their %d common seed(s) of %s and %s",
                    name, partition, base_name, len(seeds), sorted(runs_s), sorted(base),
                )  # fmt: skip
            key = scoring.final
            final = [100 * (runs_s[k].summary[key] - base[k].summary[key]) for k in seeds]
            chosen = _selected_differences(scoring, [(runs_s[k], base[k]) for k in seeds])
            low, high = t_interval(final)
            mean, std = mean_std(final)
            rows.append(
                {
                    "partition": partition,
                    "strategy": name,
                    "baseline": base_name,
                    "seeds": len(seeds),
                    "final_diff_mean": mean,
                    "final_diff_std": std,
                    "final_diff_ci95_low": low,
                    "final_diff_ci95_high": high,
                    "seeds_to_settle": seeds_to_settle(mean, std) if len(seeds) > 1 else None,
                    "wins": sum(d > 0 for d in final),
                    "ties": sum(d == 0 for d in final),
                    "losses": sum(d < 0 for d in final),
                    "val_selected_diff_mean": mean_std(chosen)[0],
                    "val_selected_diff_std": mean_std(chosen)[1],
                    "final_diffs": final,  # per common seed, in seed order (the plot's dots)
                }
            )
    return rows


def _selected_differences(scoring: Scoring, pairs: list[tuple[RunData, RunData]]) -> list[float]:
    """Per seed, the val-selected score's difference in points; [nan] when a run recorded no
    round with the score (a generative run that generated only at the end)."""
    diffs = []
    for run, base in pairs:
        a, b = scoring.val_selected(run.records), scoring.val_selected(base.records)
        if a is None or b is None:
            return [float("nan")]
        diffs.append(100 * (a[1] - b[1]))
    return diffs


def interval_text(low: float, high: float) -> str:
    return "-" if low != low else f"[{low:+.1f}, {high:+.1f}]"  # nan: fewer than 2 seeds


def _diff(row: dict[str, Any], name: str) -> str:
    """``mean ± sd`` in signed points, or the difference alone for one seed (a sd of 0 would
    read as a measured spread)."""
    mean = f"{row[name + '_mean']:+.1f}"
    return mean if row["seeds"] < 2 else f"{mean} ± {row[name + '_std']:.1f}"


def settle_text(row: dict[str, Any]) -> str:
    """``settled`` (the interval excludes 0), the seeds it would take, or ``-`` (no gap)."""
    low, high, n = row["final_diff_ci95_low"], row["final_diff_ci95_high"], row["seeds_to_settle"]
    if low == low and (low > 0 or high < 0):
        return "settled"
    if n is None:
        return "-"
    return f"> {SETTLE_CAP}" if n > SETTLE_CAP else str(n)


# What a row's "final" score is, by task kind (``Scoring.kind``).
FINAL = {
    "classification": "the final model's accuracy on the whole test split",
    "generation": "the final model's ROUGE-L on the fixed generation subset",
}


def paired_legend(kind: str) -> str:
    return (
        "Per seed, the strategy's score minus the baseline's on the same seed (the same "
        "shards, sampled clients and batches), in points; mean ± sample standard deviation "
        "over the common seeds. 95% CI: Student's t over the per-seed differences (n - 1 "
        "degrees of freedom); a gap is established when it excludes 0. A win or a loss is any "
        "difference (one test example is enough), a tie the same score. Final: "
        f"{FINAL[kind]}; val-selected: the test score, on the fixed evaluation subset, of the "
        "round with the best validation score. Seeds to settle: how many seeds the 95% CI "
        "would need to exclude 0 if the differences kept this mean and sd (the smallest n "
        "with t(n - 1) x sd / sqrt(n) < |mean|; a planning figure, as five seeds' sd is itself "
        "uncertain; - for no gap)."
    )


def write_paired(rows: list[dict[str, Any]], out: Path, scoring: Scoring = ACCURACY) -> None:
    """``paired.csv`` (every column) and ``paired.md`` (points, signed, one decimal)."""
    label = scoring.label
    lines = [
        f"| partition | strategy | vs | seeds | final {label} diff (points) | 95% CI "
        f"| seeds to settle | wins / ties / losses | val-selected {label} diff (points) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chosen = (
            "-"
            if r["val_selected_diff_mean"] != r["val_selected_diff_mean"]  # nan: not recorded
            else _diff(r, "val_selected_diff")
        )
        lines.append(
            f"| {r['partition']} | {r['strategy']} | {r['baseline']} | {r['seeds']} | "
            f"{_diff(r, 'final_diff')} | "
            f"{interval_text(r['final_diff_ci95_low'], r['final_diff_ci95_high'])} | "
            f"{settle_text(r)} | "
            f"{r['wins']} / {r['ties']} / {r['losses']} | "
            f"{chosen} |"
        )
    lines += ["", paired_legend(scoring.kind)]
    (out / "paired.md").write_text("\n".join(lines) + "\n")
    with open(out / "paired.csv", "w", newline="") as f:
        columns = list(rows[0]) if rows else ["partition", "strategy", "baseline", "seeds"]
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([csv_row(r) for r in rows])


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` for a CSV cell each: the per-seed differences as space-separated points."""
    diffs = row.get("final_diffs")
    return row if diffs is None else {**row, "final_diffs": " ".join(f"{d:+.4f}" for d in diffs)}
