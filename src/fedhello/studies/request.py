"""What a comparison is asked, checked before any cell runs: the strategies (names, shapes,
``all``, rows that are a strategy with other settings), the seeds, the partitions, the folder
it writes into and the baseline it is paired against. Each problem is one line naming the flag,
the value and what is allowed (``fedhello compare`` runs hours: a typo must not cost them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from fedhello.core.allocation import SHAPES, strategy_class, strategy_names
from fedhello.core.errors import ConfigError, RunDirError

PARTITIONS = ("iid", "pathological", "dirichlet")
# "all" in --strategies: the paper's comparison (every strategy; the four GD shapes separately)
# and its baselines (rank methods, FFA-LoRA, FedRA with its authors' subnetwork clients)
ALL_STRATEGIES = (
    "full", "exclusive", "straggler", "fedra", "geometric:uniform", "geometric:triangle",
    "geometric:inverted-triangle", "geometric:bottleneck", "randomized-geometric:bottleneck",
    "fisher", "fed-hello", "hetlora", "flexlora", "ffa-lora", "fedra-subnetwork",
)  # fmt: skip
# Rows that are a strategy with other allocation settings: row -> (strategy, settings).
ROWS: dict[str, tuple[str, dict[str, str]]] = {
    "fedra-subnetwork": ("fedra", {"client_model": "subnetwork"}),
}


def _has_shape(name: str) -> bool:
    return "shape" in strategy_class(name).Options.model_fields


def parse_strategies(text: str) -> list[str]:

    items = (
        ALL_STRATEGIES
        if text.strip() == "all"
        else [s.strip() for s in text.split(",") if s.strip()]
    )
    for item in items:
        name, _, shape = item.partition(":")
        if name in ROWS and not shape:
            continue
        if name not in strategy_names():
            names = ", ".join([*strategy_names(), *ROWS])
            raise ConfigError(
                f"--strategies: unknown strategy {name!r}; choose from: {names}, or all "
                "(a shape may follow a colon, e.g. geometric:triangle)"
            )
        if shape and shape not in SHAPES:
            raise ConfigError(
                f"--strategies: unknown shape {shape!r} in {item!r}; "
                f"choose from: {', '.join(SHAPES)}"
            )
        if shape and "shape" not in strategy_class(name).Options.model_fields:
            with_shape = [
                n for n in strategy_names() if "shape" in strategy_class(n).Options.model_fields
            ]
            raise ConfigError(
                f"--strategies: {item!r}: strategy {name!r} has no shape; allowed with a "
                f"shape: {', '.join(with_shape)}"
            )
    if not items:
        raise ConfigError("--strategies: give at least one strategy name, or all")
    return list(dict.fromkeys(items))


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r}: expected comma-separated integers, e.g. 0,1,2"
        ) from None
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"{flag} {text!r}: expected non-negative integers, e.g. 0,1,2")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:  # a seed twice would count its pair twice in the paired statistics
        raise ConfigError(
            f"{flag} {text!r}: {', '.join(map(str, repeated))} repeated; allowed: distinct values"
        )
    return values


def parse_partitions(text: str) -> list[str]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in items if p not in PARTITIONS]
    if bad or not items:
        raise ConfigError(f"--partitions {text!r}: allowed: {', '.join(PARTITIONS)}")
    return items


# what a comparison folder holds (``fedhello.studies.report`` writes the tables and plots)
FOLDER_ENTRIES = frozenset(
    {"compare.json", "runs", "plots", "results.md", "results.csv", "paired.md", "paired.csv"}
)


def check_folder(root: Path) -> None:
    """``root`` as a comparison's folder: new, empty, or holding a comparison (a ``runs/``
    with cells linked in from another comparison included); never a file or a folder of
    something else, which the comparison would fill with its runs."""
    if root.exists() and not root.is_dir():
        raise RunDirError(f"--out {str(root)!r} is a file; allowed: a new or empty folder, or "
                          "a comparison folder")  # fmt: skip
    if not root.is_dir():
        return
    foreign = sorted(p.name for p in root.iterdir() if p.name not in FOLDER_ENTRIES)
    if foreign:
        raise RunDirError(
            f"--out {str(root)!r} holds what is not a comparison's (e.g. {foreign[0]!r}); "
            "allowed: a new or empty folder, or a comparison folder"
        )


def check_baseline(baseline: str | None, strategies: Sequence[str], root: Path) -> None:
    """``--baseline`` as one of the compared strategies (as given, or as its folder name,
    ``geometric-triangle``), or of those a grown comparison already holds: checked before
    any cell runs, not after hours of them."""
    if baseline is None:
        return
    spec = root / "compare.json"
    older = json.loads(spec.read_text()).get("strategies", []) if spec.is_file() else []
    known = {n for s in [*strategies, *older] for n in (s, s.replace(":", "-"))}
    if baseline not in known:
        raise ConfigError(
            f"--baseline {baseline!r}: not a compared strategy; choose from: "
            f"{', '.join(sorted(dict.fromkeys([*strategies, *older])))}"
        )
