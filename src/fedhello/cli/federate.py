"""``fedhello run``, ``compare`` and ``report``: a federation, paired federations, and their
tables and plots again from saved metrics."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedhello.cli.output import note_defaults, setup_output
from fedhello.core.errors import UserError

if TYPE_CHECKING:
    from fedhello.engine.core import Observer
    from fedhello.engine.experiment import Experiment

# HOST:PORT, the host a name, an IPv4 address or a bracketed IPv6 one
SUPERLINK_FORM = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):\d{1,5}")


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    import fedhello
    from fedhello.api import run_dir_for
    from fedhello.core.config import load_config, load_saved_config
    from fedhello.progress import summary_table
    from fedhello.store.runs import RunDir

    if args.engine != "flower" and (args.superlink or args.root_certificates):
        given = "--superlink" if args.superlink else "--root-certificates"
        raise UserError(
            f"{given} with --engine {args.engine}: only a deployment reads it; allowed: "
            f"--engine flower with it, or leave it out"
        )
    if args.engine == "flower" and args.superlink and not SUPERLINK_FORM.fullmatch(args.superlink):
        raise UserError(
            f"--superlink {args.superlink!r}: allowed: HOST:PORT, the SuperLink's Control API "
            "address (e.g. 127.0.0.1:9093)"
        )
    if args.resume:
        if args.config or args.overrides or args.out or args.overwrite:
            raise UserError(
                "--resume RUN_DIR continues that run with its own config.toml: "
                "give no CONFIG, --set, --out or --overwrite with it"
            )
        run_dir = RunDir(args.resume)
        cfg = load_saved_config(run_dir.config_path) if run_dir.config_path.is_file() else None
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = run_dir_for(cfg, args.out)  # fedhello.run checks it before any long work
    setup_output(
        args.verbose,
        cfg is not None and cfg.model.allow_download,
        cfg is not None and cfg.train.deterministic,
    )
    console = Console(stderr=True)
    done = len(run_dir.read_metrics()) if args.resume else 0
    rounds = cfg.federation.rounds if cfg is not None else 0

    def note() -> None:  # no CONFIG: the built-in defaults are said
        if cfg is not None and not args.resume:
            note_defaults(cfg, args.config)

    deployed = args.engine == "flower"
    if deployed:  # the deployed ServerApp reaches no observer: said now
        note()
    # else said as the run starts, after every check: a run that cannot start says only why
    observer = noting_observer(console, rounds, done, (lambda: None) if deployed else note)
    summary = fedhello.run(
        None if args.resume else cfg,
        None if args.resume else run_dir.path,
        engine=args.engine,
        resume=args.resume,
        overwrite=args.overwrite,
        observer=observer,
        superlink=args.superlink,
        root_certificates=args.root_certificates,
        cache_dir=args.cache_dir,
    )
    Console().print(summary_table(summary, str(run_dir.path)))
    return 0


def noting_observer(console: Any, rounds: int, done: int, note: Callable[[], None]) -> Observer:
    """The run's progress (a RichObserver) that first calls ``note`` when the run starts:
    after every check, so that a run that cannot start says only why."""
    from fedhello.progress import RichObserver

    class Noting(RichObserver):
        def on_start(self, exp: Experiment) -> None:
            note()
            super().on_start(exp)

    return Noting(console, rounds, done)


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    import fedhello
    from fedhello.core.config import load_config
    from fedhello.progress import RichObserver

    cfg = load_config(args.config, args.overrides)
    setup_output(args.verbose, cfg.model.allow_download, cfg.train.deterministic)
    logging.getLogger("fedhello").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    console = Console(stderr=True)

    # The first cell's heading (and the defaults note) wait until that cell has started or
    # ended: a comparison that cannot start (a model or data that cannot be loaded) says only
    # why, in one line.
    pending: list[str] = []

    def announce() -> None:
        if pending:
            note_defaults(cfg, args.config, comparison=True)
            console.rule(pending.pop())

    class Announcing(RichObserver):
        def on_start(self, exp: Any) -> None:
            announce()
            super().on_start(exp)

    def on_cell(cell: Any, i: int, n: int) -> RichObserver:
        title = f"[{i + 1}/{n}] {cell.partition} / {cell.strategy} / seed {cell.seed}"
        if i == 0:
            pending.append(title)
            return Announcing(console, cfg.federation.rounds, quiet=True)
        console.rule(title)
        return RichObserver(console, cfg.federation.rounds, quiet=True)

    def on_done(cell: Any, outcome: str) -> None:
        announce()  # a reused first cell never starts
        console.print(f"  {outcome}")

    result = fedhello.compare(
        cfg, args.strategies, args.seeds, args.partitions, args.out, baseline=args.baseline,
        on_cell=on_cell, on_done=on_done, cache_dir=args.cache_dir,
    )  # fmt: skip
    out = Path(result["out"])
    Console().print((out / "results.md").read_text())
    Console().print((out / "paired.md").read_text())
    console.print(f"tables and {len(result['plots'])} plots in {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedhello.studies.report import write_report

    if len(args.path) > 1:
        return report_regimes(args)
    if args.strategies:
        raise UserError("--strategies picks the rows of a report across comparisons; allowed: "
                        "with several folders")  # fmt: skip
    (path,) = args.path
    out = Path(args.out) if args.out else Path(path)
    result = write_report(Path(path), out, baseline=_baseline(args.baseline))
    print((out / "results.md").read_text(), end="")
    print((out / "paired.md").read_text(), end="")
    print(f"{len(result['plots'])} plots in {out / 'plots'}", file=sys.stderr)
    return 0


def report_regimes(args: argparse.Namespace) -> int:
    """``fedhello report DIR DIR ... --out OUT``: the paired rows of every folder side by side
    (``fedhello.studies.regimes``)."""
    from fedhello.studies.regimes import write_regimes_report

    if not args.out:
        raise UserError(
            f"report of {len(args.path)} folders: --out is needed (where regimes.md goes); "
            "allowed: a folder"
        )
    wanted = [s.strip().replace(":", "-") for s in (args.strategies or "").split(",") if s.strip()]
    folders = [Path(p) for p in args.path]
    result = write_regimes_report(folders, Path(args.out), _baseline(args.baseline), wanted or None)
    print((Path(args.out) / "regimes.md").read_text(), end="")
    print(f"{len(result['rows'])} rows; {result['files'][-1]}", file=sys.stderr)
    return 0


def _baseline(name: str | None) -> str | None:
    """``--baseline`` as its runs' folder name (``name:shape`` -> ``name-shape``, as compare)."""
    return None if name is None else name.replace(":", "-")
