"""Tables and plots from saved metrics alone (``fedhello report``), for a comparison folder or
a single run directory. Nothing here trains or needs torch.

Accuracy columns: ``final`` is each run's whole-test-split accuracy after the last round
(summary.json); ``last-5`` averages the per-round accuracy (on the fixed evaluation subset) of
the last five rounds; ``val-selected`` picks each run's round of best validation accuracy and
reports the test accuracy of that round: the test set never chooses anything. ``train MB by tier``
is the largest per-client training memory in each tier: tensors autograd saved for the
backward pass (peak step) plus gradients and AdamW state of the trained tensors; it excludes
the frozen model every client holds anyway (on an accelerator: the allocator's peak,
``device_peak_memory_mb``, everything on the device, the measure its memory limits bound:
``fedhello.core.fit.recorded_memory_mb``). With memory limits a second table sets, per tier,
the largest training memory of any client in any seed against the tier's limit, with the
number of repaired layer sets per run (``allocation.fit = repair``).

Collapse columns (``predicted classes``): the fewest classes any seed's final model predicts
on the whole test split (summary.json's ``predicted_classes``; 1: it answers one class,
whatever its accuracy), and the mean over seeds of the entropy of its predictions in nats
(``prediction_entropy``: 0 for one class, log K for an even spread over K). Runs written before
these keys existed show ``-``.

A generative comparison (``causal-lm`` runs, ``fedhello.studies.scores``) has its own columns:
the final model's ROUGE-L and exact match on the generation subset, perplexity on the whole
test split, the base model's zero-shot ROUGE-L on the same prompts, the test ROUGE-L of the
generated round with the lowest validation loss, and the same cost columns; its paired
differences are ROUGE-L points.
"""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedhello.core.errors import RunDirError
from fedhello.core.fit import recorded_memory_mb
from fedhello.core.numerics import NUMERICS_VERSION, recorded_version
from fedhello.store.provenance import code_label
from fedhello.store.runs import check_folder
from fedhello.studies.paired import paired_differences, write_paired
from fedhello.studies.plots import forest_plot, write_plots
from fedhello.studies.results import Row, RunData, collect, group, mean_std
from fedhello.studies.scores import ACCURACY, ROUGE_L, Scoring, scoring_of
from fedhello.studies.tables import TABLE_LEGEND, write_tables

logger = logging.getLogger(__name__)


def summarize(rows: list[Row], scoring: Scoring = ACCURACY) -> list[dict[str, Any]]:
    """One table row per (partition, strategy): scores over seeds, then cost columns."""
    if scoring is ROUGE_L:
        return [generative_columns(row) | cost_columns(row) for row in rows]
    table = []
    for row in rows:
        accuracy = mean_std([r.summary["test_accuracy"] for r in row.runs])
        f1 = mean_std([r.summary["test_macro_f1"] for r in row.runs])
        last5 = [
            statistics.fmean([x["test_accuracy"] for x in r.records if "test_accuracy" in x][-5:])
            for r in row.runs
        ]
        selected = [_selected(scoring, r) for r in row.runs]
        table.append(
            {
                "partition": row.partition,
                "strategy": row.strategy,
                "seeds": len(row.runs),
                "acc_mean": accuracy[0],
                "acc_std": accuracy[1],
                "f1_mean": f1[0],
                "f1_std": f1[1],
                "last5_mean": statistics.fmean(last5),
                "val_round_mean": statistics.fmean(s[0] for s in selected),
                "val_selected_acc_mean": statistics.fmean(s[1] for s in selected),
                **cost_columns(row),
                **collapse_columns(row),
                **privacy_columns(row),
            }
        )
    return table


def privacy_columns(row: Row) -> dict[str, Any]:
    """Under client-level DP: the largest epsilon any seed spent (None: infinite, no noise)
    and its delta; nothing for runs without DP (so their tables keep their columns)."""
    private = [r.summary for r in row.runs if "delta" in r.summary and "epsilon" in r.summary]
    if not private:
        return {}
    spent = [s["epsilon"] for s in private]
    return {
        "epsilon": None if None in spent else max(spent),
        "delta": max(s["delta"] for s in private),
        # seeded noise (a study's): the epsilon is nominal, void against whoever knows the seed
        "noise": "seeded" if any(s.get("noise") == "seeded" for s in private) else "secret",
    }


def _selected(scoring: Scoring, run: RunData) -> tuple[int, float]:
    chosen = scoring.val_selected(run.records)
    if chosen is None:  # a classifier records accuracy every round
        raise RunDirError(
            f"{run.partition}/{run.strategy}/seed{run.seed} records no {scoring.final}"
        )
    return chosen


def generative_columns(row: Row) -> dict[str, Any]:
    """A generative row's scores: ROUGE-L and exact match of the final model on the generation
    subset, perplexity on the whole test split, the base model's zero-shot ROUGE-L on the same
    prompts, and the validation-selected generated round (None where a run generated only at
    the end)."""
    rouge = mean_std([r.summary["test_rouge_l"] for r in row.runs])
    exact = mean_std([r.summary["test_exact_match"] for r in row.runs])
    perplexity = mean_std([r.summary["test_perplexity"] for r in row.runs])
    selected = [ROUGE_L.val_selected(r.records) for r in row.runs]
    known = [s for s in selected if s is not None]
    every = len(known) == len(selected)
    return {
        "partition": row.partition,
        "strategy": row.strategy,
        "seeds": len(row.runs),
        "rouge_l_mean": rouge[0],
        "rouge_l_std": rouge[1],
        "exact_match_mean": exact[0],
        "exact_match_std": exact[1],
        "perplexity_mean": perplexity[0],
        "perplexity_std": perplexity[1],
        "zero_shot_rouge_l_mean": statistics.fmean(
            r.summary["zero_shot_rouge_l"] for r in row.runs
        ),
        "val_round_mean": statistics.fmean(s[0] for s in known) if every else None,
        "val_selected_rouge_l_mean": statistics.fmean(s[1] for s in known) if every else None,
    }


def cost_columns(row: Row) -> dict[str, Any]:
    """What the runs cost: client compute, training memory per tier (mean and largest over
    seeds, against the tier's limit), repairs, traffic."""
    tiers: dict[int, list[float]] = defaultdict(list)
    limits: dict[int, float] = {}
    for r in row.runs:
        peak: dict[int, float] = {}
        for rec in r.records:
            for c in rec["clients"]:
                peak[c["tier"]] = max(peak.get(c["tier"], 0.0), recorded_memory_mb(c))
                if c.get("memory_limit_mb") is not None:
                    limits[c["tier"]] = max(limits.get(c["tier"], 0.0), c["memory_limit_mb"])
        for tier, mb in peak.items():
            tiers[tier].append(mb)
    return {
        "client_seconds": statistics.fmean(r.summary["client_seconds"] for r in row.runs),
        "train_mb_by_tier": {t: statistics.fmean(v) for t, v in sorted(tiers.items())},
        # the largest over seeds, against the tier's limit: a limit must hold in every run
        "train_mb_max_by_tier": {t: max(v) for t, v in sorted(tiers.items())},
        "limit_mb_by_tier": dict(sorted(limits.items())),
        "repairs": statistics.fmean(
            sum(x.get("num_repairs", 0) for x in r.records) for r in row.runs
        ),
        "mb_up": statistics.fmean(r.summary["bytes_up"] for r in row.runs) / 1e6,
        "mb_down": statistics.fmean(r.summary["bytes_down"] for r in row.runs) / 1e6,
    }


def collapse_columns(row: Row) -> dict[str, Any]:
    """``pred_classes_min`` (the fewest classes a seed's final model predicts),
    ``pred_entropy_mean`` (nats) and ``num_classes``, over the runs that recorded them; None
    where none did (runs of an older fedhello)."""
    classes = [r.summary["predicted_classes"] for r in row.runs if "predicted_classes" in r.summary]
    entropy = [
        r.summary["prediction_entropy"] for r in row.runs if "prediction_entropy" in r.summary
    ]
    known = [r.summary["num_classes"] for r in row.runs if "num_classes" in r.summary]
    return {
        "pred_classes_min": min(classes) if classes else None,
        "pred_entropy_mean": statistics.fmean(entropy) if entropy else None,
        "num_classes": max(known) if known else None,
    }


def write_report(
    root: Path, out: Path | None = None, baseline: str | None = None
) -> dict[str, Any]:
    """Tables (results.*, paired.*) and plots (plots/*.png) into ``out`` (default: root).

    Everything that can refuse (the runs, ``out``, ``baseline``) is checked before ``out`` is
    made: a refused report leaves no folder behind."""
    root = Path(root)
    out = Path(out) if out else root
    runs = collect(root)
    check_folder(out, "--out")
    check_folder(out / "plots", "--out")
    warn_mixed_numerics(runs, root)
    scoring = scoring_of(runs)
    table = summarize(group(runs), scoring)
    paired = paired_differences(runs, baseline, scoring)  # a bad --baseline fails before writes
    out.mkdir(parents=True, exist_ok=True)
    notes = [TABLE_LEGEND[scoring.kind], code_line(runs, root)]
    write_tables(table, out, scoring, notes)
    write_paired(paired, out, scoring)
    plots = write_plots(runs, out / "plots", scoring)
    if paired:
        labels = [f"{r['strategy']} - {r['baseline']} ({r['partition']}, n={r['seeds']})"
                  for r in paired]  # fmt: skip
        title = f"paired {scoring.label} differences, {root.resolve().name}"
        plots.append(forest_plot(paired, labels, out / "plots" / "paired.png", title))
    return {"table": table, "paired": paired, "plots": [str(p) for p in plots]}


def code_line(runs: list[RunData], root: Path) -> str:
    """Which code computed the runs (``summary.json``'s ``code``: a commit, or ``unrecorded``
    for runs from before it was kept), with a warning in the log when it is more than one."""
    labels: dict[str, int] = defaultdict(int)
    for run in runs:
        labels[code_label(run.summary.get("code"))] += 1
    if len([k for k in labels if k != "unrecorded"]) > 1:
        logger.warning(
            "%s holds runs computed by different code (%s): a behaviour change between them "
            "may sit in its tables",
            root, ", ".join(sorted(labels)),
        )  # fmt: skip
    made = ", ".join(f"{label} ({n} run{'s' * (n > 1)})" for label, n in sorted(labels.items()))
    older = (
        " Runs computed by code before commit 983e833 (2026-12-07) did not record it."
        if "unrecorded" in labels
        else ""
    )
    return f"Computed by fedhello at: {made}.{older}"


def warn_mixed_numerics(runs: list[RunData], root: Path) -> None:
    """Say so when the runs' numbers come from more than one numerics version
    (``fedhello.core.numerics``): the tables are still written, as the folder holds them, but
    ``fedhello compare`` on it would first run the older cells again."""
    versions: dict[int, int] = defaultdict(int)
    for run in runs:
        versions[recorded_version(run.summary)] += 1
    if len(versions) > 1:
        counts = ", ".join(f"{n} run(s) of version {v}" for v, n in sorted(versions.items()))
        logger.warning(
            "%s mixes numerics versions (%s): its tables set numbers of different arithmetic "
            "side by side; fedhello compare on it recomputes the cells older than version %d",
            root, counts, NUMERICS_VERSION,
        )  # fmt: skip
