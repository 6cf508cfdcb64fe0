"""The ``fedhello`` command. The only place that configures output and turns errors into exits:
a user error is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from fedhello.errors import RunDirError, UserError

EXIT_USER_ERROR = 2

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedhello", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def config_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", nargs="?", help="TOML config (default: built-in defaults)")
        sp.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config value, e.g. --set federation.rounds=5 (repeatable)",
        )  # fmt: skip

    run = sub.add_parser("run", help="run a federation")
    config_args(run)
    run.add_argument("--out", help="run directory (default: RUN.OUT_DIR/<run name>)")
    run.add_argument(
        "--engine",
        default="embedded",
        choices=["embedded", "flower-sim", "flower"],
        help="embedded (one process), flower-sim (Flower's simulation) or flower (a SuperLink)",
    )
    run.add_argument(
        "--superlink", metavar="HOST:PORT", help="--engine flower: Control API address"
    )
    run.add_argument("--root-certificates", help="--engine flower: CA certificate for TLS")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.add_argument(
        "--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last complete round"
    )

    val = sub.add_parser("validate", help="check a config and print it resolved")
    config_args(val)

    plan = sub.add_parser("plan", help="show the layer allocation without training")
    config_args(plan)
    plan.add_argument("--rounds", type=int, help="rounds to plan (default: federation.rounds)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")

    cmp = sub.add_parser("compare", help="paired runs of strategies over seeds and partitions")
    config_args(cmp)
    cmp.add_argument(
        "--strategies", default="all", help="comma-separated names (name:shape) or all"
    )
    cmp.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    cmp.add_argument(
        "--partitions", help="comma-separated: iid,pathological,dirichlet (default: config's)"
    )
    cmp.add_argument("--out", help="comparison folder (default: RUN.OUT_DIR/compare-<run name>)")

    rep = sub.add_parser("report", help="tables and plots again from saved metrics")
    rep.add_argument("path", help="a comparison folder or a run directory")
    rep.add_argument("--out", help="where to write (default: the folder itself)")
    exp = sub.add_parser("export", help="a finished run as a standalone model (LoRA merged in)")
    exp.add_argument("run_dir", help="a finished run directory")
    exp.add_argument(
        "--merged", required=True, metavar="OUT",
        help="folder for a plain transformers model with the LoRA merged into its weights",
    )  # fmt: skip
    exp.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    for sp in (cmp, rep):
        sp.add_argument(
            "--baseline",
            help="strategy the paired differences are taken against (default: fedra, else full)",
        )
    return p


def _setup_output(verbose: bool) -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("fedhello").setLevel(logging.DEBUG if verbose else logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # `validate` and `plan` may run without the heavy stack
        pass


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedhello.config import load_config
    from fedhello.runs import RunDir

    if args.resume:
        if args.config or args.overrides or args.out or args.overwrite:
            raise UserError(
                "--resume RUN_DIR continues that run with its own config.toml: "
                "give no CONFIG, --set, --out or --overwrite with it"
            )
        run = RunDir(args.resume)
        if not run.config_path.is_file():
            raise RunDirError(f"--resume {args.resume!r}: no config.toml there, not a fedhello run")
        cfg = load_config(run.config_path)
    else:
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else Path(cfg.run.out_dir) / cfg.run_name()
        run = RunDir(out)
        run.check_free(args.overwrite)  # before any long work
    _setup_output(args.verbose)
    from fedhello.engine.simulation import run_embedded
    from fedhello.progress import RichObserver, summary_table

    console = Console(stderr=True)
    done = len(run.read_metrics()) if args.resume else 0
    observer = RichObserver(console, cfg.federation.rounds, done)
    if args.engine == "flower-sim":
        from fedhello.engine.flower.runner import run_flower_sim

        summary = run_flower_sim(
            cfg, run, observer, overwrite=args.overwrite, resume=bool(args.resume)
        )
    elif args.engine == "flower":
        from fedhello.engine.flower.runner import run_flower_deployment

        if not args.superlink:
            raise UserError("--engine flower needs --superlink HOST:PORT (the Control API)")
        summary = run_flower_deployment(
            cfg, run, args.superlink, args.root_certificates, overwrite=args.overwrite,
            resume=bool(args.resume),
        )  # fmt: skip
    else:
        summary = run_embedded(
            cfg, run, observer, overwrite=args.overwrite, resume=bool(args.resume)
        )
    Console().print(summary_table(summary, str(run.path)))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from fedhello.config import load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(cfg.to_toml())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from fedhello.config import load_config
    from fedhello.errors import ConfigError
    from fedhello.plan import make_plan, render_plan

    cfg = load_config(args.config, args.overrides)
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds {args.rounds}: must be at least 1")
    if cfg.allocation.strategy in ("fisher", "fed-hello"):
        _setup_output(args.verbose)
    plan = make_plan(cfg, args.rounds)
    if args.json:
        sys.stdout.write(json.dumps(plan) + "\n")
    else:
        render_plan(plan, Console())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedhello.compare import parse_ints, parse_partitions, parse_strategies, run_compare
    from fedhello.config import load_config
    from fedhello.report import write_report

    cfg = load_config(args.config, args.overrides)
    strategies = parse_strategies(args.strategies)
    seeds = parse_ints(args.seeds, "--seeds")
    partitions = parse_partitions(args.partitions or cfg.data.partition)
    out = (
        Path(args.out)
        if args.out
        else Path(cfg.run.out_dir) / f"compare-{cfg.run.name or 'default'}"
    )
    _setup_output(args.verbose)
    logging.getLogger("fedhello").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    from fedhello.progress import RichObserver

    console = Console(stderr=True)

    def on_cell(cell: Any, i: int, n: int) -> Any:
        console.rule(f"[{i + 1}/{n}] {cell.partition} / {cell.strategy} / seed {cell.seed}")
        return RichObserver(console, cfg.federation.rounds, quiet=True)

    run_compare(cfg, out, strategies, seeds, partitions, on_cell=on_cell,
                on_done=lambda cell, outcome: console.print(f"  {outcome}"))  # fmt: skip
    result = write_report(out, baseline=args.baseline)
    Console().print((out / "results.md").read_text())
    Console().print((out / "paired.md").read_text())
    console.print(f"tables and {len(result['plots'])} plots in {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedhello.report import write_report

    out = Path(args.out) if args.out else Path(args.path)
    result = write_report(Path(args.path), out, baseline=args.baseline)
    print((out / "results.md").read_text(), end="")
    print((out / "paired.md").read_text(), end="")
    print(f"{len(result['plots'])} plots in {out / 'plots'}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedhello.export import check_export, export_merged

    _setup_output(args.verbose)
    check_export(Path(args.run_dir), Path(args.merged), args.overwrite)  # before heavy imports
    loader = export_merged(Path(args.run_dir), Path(args.merged), args.overwrite)
    print(f"merged model in {args.merged}: load it with "
          f"transformers.{loader}.from_pretrained({args.merged!r})")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        commands = {
            "run": cmd_run, "validate": cmd_validate, "plan": cmd_plan,
            "compare": cmd_compare, "report": cmd_report, "export": cmd_export,
        }  # fmt: skip
        return commands[args.command](args)
    except UserError as err:
        print(f"fedhello: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fedhello: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
