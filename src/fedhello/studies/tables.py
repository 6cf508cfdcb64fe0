"""The comparison's tables as files: ``results.csv`` (every column of
``fedhello.studies.report.summarize``) and ``results.md`` (the columns a reader compares, one
row per partition and strategy, then a legend of what each column means and which code computed
the runs). Columns are defined in ``fedhello.studies.report``; here they are only rendered.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedhello.studies.results import REFERENCE_PARTITION
from fedhello.studies.scores import ACCURACY, ROUGE_L, Scoring

TABLE_LEGEND = {
    "classification": (
        "Mean ± sample standard deviation over seeds. Final acc and macro-F1: the final model "
        "on the whole test split; last-5 acc (the mean of the last 5 rounds) and val-selected "
        "acc (the round with the best validation accuracy, its mean round in brackets): on the "
        "fixed evaluation subset. Client s: client compute summed over rounds; train MB by "
        "tier: the largest training memory of a client of the tier in a run, mean over seeds "
        "(MB = 2^20 bytes; on a CPU the meter's, the frozen model left out, on an accelerator "
        "its allocator's peak; - where no client of the tier trained); "
        "MB up / down: traffic summed over clients and rounds (MB = 10^6 bytes). Predicted "
        "classes: the fewest the final model answers on the test split over seeds; entropy "
        "(nats) of its answers, mean over seeds."
    ),
    "generation": (
        "Mean ± sample standard deviation over seeds. Final ROUGE-L and exact match: the final "
        "model's greedy answers on the fixed generation subset; val-selected: the generated "
        "round with the lowest validation loss (its mean round in brackets). Client s, train "
        "MB (2^20 bytes) and MB up / down (10^6 bytes) as for classifiers."
    ),
}


def collapse_cell(r: dict[str, Any]) -> str:
    """``min of K / entropy``, e.g. ``1 of 4 / 0.00``; ``-`` for what was not recorded."""
    if r.get("pred_classes_min") is None:
        classes = "-"
    elif r.get("num_classes") is None:
        classes = str(r["pred_classes_min"])
    else:
        classes = f"{r['pred_classes_min']} of {r['num_classes']}"
    entropy = r.get("pred_entropy_mean")
    return f"{classes} / {'-' if entropy is None else f'{entropy:.2f}'}"


BY_TIER = ("train_mb_by_tier", "train_mb_max_by_tier", "limit_mb_by_tier")


def write_tables(
    table: list[dict[str, Any]], out: Path, scoring: Scoring = ACCURACY,
    notes: Sequence[str] = (),
) -> None:  # fmt: skip
    """``results.csv`` (every column) and ``results.md`` (the table, then ``notes``: what its
    columns mean and which code computed the runs)."""
    keys = list(dict.fromkeys(k for row in table for k in row))  # DP rows add epsilon, delta
    columns = [k for k in keys if k not in BY_TIER] + list(BY_TIER)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in table:
            writer.writerow(row | {k: json.dumps(row[k]) for k in BY_TIER})
    lines = generative_lines(table) if scoring is ROUGE_L else accuracy_lines(table)
    if any("delta" in r for r in table):  # client-level DP: what each row spent
        lines = with_privacy_column(lines, table)
    if any(r["limit_mb_by_tier"] for r in table):
        lines += ["", *resource_lines(table)]
    if notes:
        lines += ["", *notes]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def with_privacy_column(lines: list[str], table: list[dict[str, Any]]) -> list[str]:
    """The table's lines with an ``epsilon (delta)`` column last (``-``: a row without DP;
    ``inf``: DP without noise; ``seeded``: noise derived from the seed, a study's nominal
    epsilon, said under the table)."""
    cells = []
    for r in table:
        if "delta" not in r:
            cells.append("-")
        else:
            eps = "inf" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
            seeded = " seeded" if r.get("noise") == "seeded" else ""
            cells.append(f"{eps} ({r['delta']:.2g}){seeded}")
    head, rule, *rows = lines
    out = [
        head + " epsilon (delta) |",
        rule + "---|",
        *(f"{x} {c} |" for x, c in zip(rows, cells, strict=True)),
    ]
    if any(r.get("noise") == "seeded" for r in table):
        out += ["", "seeded: the noise and the client sample derive from the run's seed "
                "(`privacy.noise = \"seeded\"`, a study's setting, so that strategies are paired); "
                "its epsilon is what the accountant gives for the mechanism, and no guarantee "
                "against whoever knows the seed."]  # fmt: skip
    return out


def generative_lines(table: list[dict[str, Any]]) -> list[str]:
    """ROUGE-L and exact match in points (0-100), perplexity as is."""
    lines = [
        "| partition | strategy | seeds | final ROUGE-L | exact match | test perplexity | "
        "zero-shot ROUGE-L | val-selected ROUGE-L (round) | client s | train MB by tier | "
        "MB up / down |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        tiers = tier_cell(r, table)
        selected = (
            "-"
            if r["val_selected_rouge_l_mean"] is None
            else f"{100 * r['val_selected_rouge_l_mean']:.1f} ({r['val_round_mean']:.1f})"
        )
        lines.append(
            f"| {r['partition']} | {r['strategy']} | {r['seeds']} | "
            f"{pm(r, 'rouge_l', 100)} | {pm(r, 'exact_match', 100)} | "
            f"{pm(r, 'perplexity', 1, '.2f')} | "
            f"{100 * r['zero_shot_rouge_l_mean']:.1f} | {selected} | "
            f"{r['client_seconds']:.1f} | {tiers} | {r['mb_up']:.1f} / {r['mb_down']:.1f} |"
        )
    return lines


def pm(r: dict[str, Any], name: str, scale: float, spec: str = ".1f") -> str:
    """``mean ± sd`` of a row's ``name`` (scaled), or the value alone for one seed: a standard
    deviation of 0 would read as a measured spread."""
    mean = format(scale * r[f"{name}_mean"], spec)
    return mean if r["seeds"] < 2 else f"{mean} ± {format(scale * r[f'{name}_std'], spec)}"


def tier_cell(r: dict[str, Any], table: list[dict[str, Any]]) -> str:
    """A row's training memory per tier, in the order of every tier the table holds, ``-``
    where no client of the tier trained (Exclusive's lower tiers): a value stays under its
    tier."""
    mine = r["train_mb_by_tier"]
    if r["partition"] == REFERENCE_PARTITION:  # one client holding the pool: no tiers
        return " / ".join(f"{v:.1f}" for v in mine.values())
    tiers = sorted({t for row in table for t in row["train_mb_by_tier"]
                    if row["partition"] != REFERENCE_PARTITION})  # fmt: skip
    return " / ".join(f"{mine[t]:.1f}" if t in mine else "-" for t in tiers)


def accuracy_lines(table: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| partition | strategy | seeds | final acc | final macro-F1 | last-5 acc | val-selected "
        "acc (round) | client s | train MB by tier | MB up / down | predicted classes (min) / "
        "entropy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        tiers = tier_cell(r, table)
        lines.append(
            f"| {r['partition']} | {r['strategy']} | {r['seeds']} | "
            f"{pm(r, 'acc', 100)} | {pm(r, 'f1', 100)} | {100 * r['last5_mean']:.1f} | "
            f"{100 * r['val_selected_acc_mean']:.1f} ({r['val_round_mean']:.1f}) | "
            f"{r['client_seconds']:.1f} | {tiers} | {r['mb_up']:.1f} / {r['mb_down']:.1f} | "
            f"{collapse_cell(r)} |"
        )
    return lines


def resource_lines(table: list[dict[str, Any]]) -> list[str]:
    """Memory limits against what was measured: per tier, the largest training memory any
    client of the tier used in any seed, over the tier's limit; and the repairs per run."""
    lines = [
        "| partition | strategy | largest train MB / limit, by tier | repairs per run | client s |",
        "|---|---|---|---|---|",
    ]
    for r in table:
        limits = r["limit_mb_by_tier"]
        cells = " / ".join(
            f"{mb:.1f} of {limits[t]:g}" if t in limits else f"{mb:.1f}"
            for t, mb in r["train_mb_max_by_tier"].items()
        )
        lines.append(
            f"| {r['partition']} | {r['strategy']} | {cells} | {r['repairs']:.1f} | "
            f"{r['client_seconds']:.1f} |"
        )
    return lines
