"""Pictures of a comparison (matplotlib, written as PNG): accuracy curves (a generative task's
loss curves) with seed bands, layer x round coverage heatmaps, realized coverage vs the target
shape, client cost against budget and against the lowest trained layer, and the paired
differences as a forest plot (also across comparisons: ``fedhello.studies.regimes``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedhello.core.fit import recorded_memory_mb
from fedhello.studies.results import CENTRALIZED, REFERENCE_PARTITION, RunData
from fedhello.studies.scores import ACCURACY, Scoring


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_partition(runs: list[RunData]) -> dict[str, dict[str, list[RunData]]]:
    out: dict[str, dict[str, list[RunData]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        out[r.partition][r.strategy].append(r)
    return out


def _panels(n: int) -> tuple[Any, Any, Any]:
    """One small panel per strategy, four to a row."""
    plt = _plt()
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    return plt, fig, axes


def accuracy_plot(
    partition: str, groups: dict[str, list[RunData]], reference: list[RunData], path: Path,
    scoring: Scoring = ACCURACY,
) -> Path:  # fmt: skip
    """``scoring``'s per-round curve (accuracy; a generative task's test loss), mean over
    seeds with a min-max band."""
    plt = _plt()
    key, scale = scoring.curve, scoring.curve_scale
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors  # 11 strategies: the default 10-colour cycle repeats
    series = [*groups.items(), *([("centralized", reference)] if reference else [])]
    for i, (strategy, runs) in enumerate(series):
        rounds = [x["round"] for x in runs[0].records if key in x]
        accuracy = np.array([[x[key] for x in r.records if key in x] for r in runs])
        mean = accuracy.mean(axis=0)
        style = "--" if strategy == "centralized" else "-"
        label = f"{strategy} (n={len(runs)})"
        (line,) = ax.plot(
            rounds, scale * mean, style, color=colors[(2 * i) % 20 + (2 * i) // 20], label=label
        )
        if len(runs) > 1:
            ax.fill_between(
                rounds,
                scale * accuracy.min(axis=0),
                scale * accuracy.max(axis=0),
                alpha=0.15,
                color=line.get_color(),
            )
    ax.set(
        xlabel="round",
        ylabel=scoring.curve_label,
        title=f"{scoring.curve_label.split(' (')[0].capitalize()} per round, {partition} "
        "(band: min-max over seeds)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap_plot(partition: str, groups: dict[str, list[RunData]], path: Path) -> Path:
    plt, fig, axes = _panels(len(groups))
    vmax = max(max(max(x["coverage"]) for x in rs[0].records) for rs in groups.values()) or 1
    for ax, (strategy, runs) in zip(axes.flat, groups.items(), strict=False):
        cov = np.array([x["coverage"] for x in runs[0].records]).T  # layers x rounds
        im = ax.imshow(cov, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=vmax)
        ax.set(title=f"{strategy} (seed {runs[0].seed})", xlabel="round", ylabel="layer")
        ax.set_xticks(range(cov.shape[1]), [str(x["round"]) for x in runs[0].records], fontsize=6)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="clients training the layer")
    fig.suptitle(f"Coverage per layer and round, {partition}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def coverage_plot(partition: str, groups: dict[str, list[RunData]], path: Path) -> Path:
    plt, fig, axes = _panels(len(groups))
    for ax, (strategy, runs) in zip(axes.flat, groups.items(), strict=False):
        total = np.sum([np.sum([x["coverage"] for x in r.records], axis=0) for r in runs], axis=0)
        share = total / max(1, total.sum())
        layers = np.arange(len(share))
        ax.bar(layers, share, color="tab:blue", alpha=0.7, label="realized")
        target = runs[0].summary.get("target")
        if target:
            ax.plot(layers, target, "o-", color="tab:red", label="target shape")
        ax.set(title=strategy, xlabel="layer (shallow -> deep)", ylabel="share of layer-slots")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle(f"Realized coverage vs target, {partition} (all seeds and rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cost_plot(partition: str, groups: dict[str, list[RunData]], path: Path) -> Path:
    plt = _plt()
    metrics = [
        ("seconds", "seconds per round"),
        ("train_memory_mb", "training memory (MB)"),
        ("bytes_up", "MB uploaded"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    rng = np.random.default_rng(0)
    for strategy, runs in groups.items():
        # a client that sat out (exclusive) trained nothing and has no lowest layer
        clients = [c for r in runs for x in r.records for c in x["clients"] if c["layers"]]
        if not clients:
            continue
        budget = np.array([c["budget"] for c in clients]) + rng.uniform(-0.2, 0.2, len(clients))
        lowest = np.array([min(c["layers"]) for c in clients]) + rng.uniform(
            -0.2, 0.2, len(clients)
        )
        for col, (key, label) in enumerate(metrics):
            y = np.array([c[key] for c in clients], dtype=float) / (1e6 if key == "bytes_up" else 1)
            axes[0, col].scatter(budget, y, s=8, alpha=0.5, label=strategy)
            axes[1, col].scatter(lowest, y, s=8, alpha=0.5, label=strategy)
            axes[0, col].set(xlabel="budget (layers)", ylabel=label)
            axes[1, col].set(xlabel="lowest trained layer", ylabel=label)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Client cost against budget and against the lowest trained layer, {partition}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def peak_train_mb(run: RunData) -> float:
    """The largest training memory any client of the run used, in the measure the table and
    the limits read (``recorded_memory_mb``: an accelerator's allocator peak where recorded)."""
    return max((recorded_memory_mb(c) for x in run.records for c in x["clients"]), default=0.0)


def mean_train_mb(run: RunData) -> float:
    """The mean training memory of a client that trained, over all its rounds (same measure)."""
    used = [recorded_memory_mb(c) for x in run.records for c in x["clients"] if c["layers"]]
    return float(np.mean(used)) if used else 0.0


def _spread(values: np.ndarray) -> list[list[float]]:
    """Min-max error bar lengths about the mean, never below 0: the mean of equal values may
    round a hair past them (3 x 52.3 -> 52.29999999999999), which matplotlib refuses."""
    mean = float(values.mean())
    return [[max(0.0, mean - float(values.min()))], [max(0.0, float(values.max()) - mean)]]


def resource_plot(
    partition: str, groups: dict[str, list[RunData]], path: Path, scoring: Scoring = ACCURACY
) -> Path:
    """Final score (accuracy; a generative task's ROUGE-L) against what it cost: total client
    compute, peak client training memory and the mean over the clients that trained (the peak
    is the strongest tier's, often the same for every strategy), one point per strategy (mean
    over seeds, bars: min-max)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for strategy, runs in groups.items():
        accuracy = 100 * np.array([r.summary[scoring.final] for r in runs])
        costs = {
            "client_seconds": np.array([r.summary["client_seconds"] for r in runs]),
            "peak_mb": np.array([peak_train_mb(r) for r in runs]),
            "mean_mb": np.array([mean_train_mb(r) for r in runs]),
        }
        for ax, key in zip(axes, costs, strict=True):
            x = costs[key]
            ax.errorbar(
                x.mean(), accuracy.mean(),
                xerr=_spread(x), yerr=_spread(accuracy),
                fmt="o", capsize=3, label=f"{strategy} (n={len(runs)})",
            )  # fmt: skip
    score = "final test accuracy (%)" if scoring is ACCURACY else f"final test {scoring.label}"
    axes[0].set(xlabel="total client compute per run (s)", ylabel=score)
    axes[1].set(xlabel="peak client training memory (MB)", ylabel=score)
    axes[2].set(xlabel="mean training memory of a training client (MB)", ylabel=score)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{'Accuracy' if scoring is ACCURACY else scoring.label} against resources, "
                 f"{partition} (bars: min-max over seeds)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(runs: list[RunData], out: Path, scoring: Scoring = ACCURACY) -> list[Path]:
    """Per partition: the score's curves (``accuracy-*``; a generative task's ``loss-*``),
    coverage heatmap and against the target, client costs, score against resources."""
    out.mkdir(parents=True, exist_ok=True)
    curve = "accuracy" if scoring is ACCURACY else "loss"
    score = "accuracy" if scoring is ACCURACY else "rouge-l"
    by_partition = _by_partition(runs)
    reference = by_partition.pop(REFERENCE_PARTITION, {}).get(CENTRALIZED, [])
    written = []
    for partition, groups in sorted(by_partition.items()):
        written.append(
            accuracy_plot(partition, groups, reference, out / f"{curve}-{partition}.png", scoring)
        )
        written.append(heatmap_plot(partition, groups, out / f"coverage-heatmap-{partition}.png"))
        written.append(
            coverage_plot(partition, groups, out / f"coverage-vs-target-{partition}.png")
        )
        written.append(cost_plot(partition, groups, out / f"client-cost-{partition}.png"))
        written.append(
            resource_plot(partition, groups, out / f"{score}-vs-resources-{partition}.png", scoring)
        )
    return written


def forest_plot(rows: list[dict[str, Any]], labels: list[str], path: Path, title: str) -> Path:
    """Paired differences (``paired_differences``' rows), one line per row, top to bottom,
    named by ``labels``: the mean (a diamond), its 95% interval (a bar; absent below two
    seeds) and every seed's difference (dots), against a line at 0. An interval clear of the
    line is an established gap; dots on both sides are a sign that flips between seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.42 * max(1, len(rows))))
    for y, row in enumerate(reversed(rows)):
        low, high = row["final_diff_ci95_low"], row["final_diff_ci95_high"]
        settled = low == low and (low > 0 or high < 0)  # nan: fewer than 2 seeds
        color = "tab:blue" if settled else "tab:gray"
        if low == low:
            ax.plot([low, high], [y, y], color=color, linewidth=2.5, solid_capstyle="butt")
        diffs = row.get("final_diffs", [])
        ax.scatter(diffs, [y] * len(diffs), s=14, color="black", alpha=0.55, zorder=3)
        ax.scatter([row["final_diff_mean"]], [y], marker="D", s=40, color=color, zorder=4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), list(reversed(labels)))
    ax.set_xlabel("points; dots: seeds, diamond: mean, bar: 95% interval (blue: excludes 0)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
