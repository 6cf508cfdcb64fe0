"""The ``fedhello`` command. The only place that configures output and turns errors into exits:
a user error is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from fedhello.api import ENGINES
from fedhello.core.errors import UserError
from fedhello.environment import apply_offline_env

EXIT_USER_ERROR = 2

# What ``fedhello --help`` opens with: for the user (the module docstring is for developers).
DESCRIPTION = (
    "Federated LoRA fine-tuning of foundation models with heterogeneous per-client layer "
    "allocation: each client trains only as many LoRA layers as its resources allow, and a "
    "strategy (Fed-HeLLo, FedRA, HetLoRA, ...) decides which; text, image and multiple-choice "
    "classification, and instruction tuning of decoder LLMs (causal-lm). Runs in one process "
    "(--engine embedded) or on Flower (flower-sim, or flower with a "
    "SuperLink). Start with: fedhello run [CONFIG]; compare strategies with fedhello compare, "
    "tabulate with fedhello report; plan, calibrate, export, eval and env explain the rest."
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedhello", description=DESCRIPTION)
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
        choices=list(ENGINES),
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
    ev = sub.add_parser(
        "eval", help="score a finished causal-lm run with lm-eval (EleutherAI's harness)"
    )
    ev.add_argument("run_dir", help="a finished causal-lm run directory")
    ev.add_argument(
        "--lm-eval", required=True, metavar="TASKS", dest="lm_eval",
        help="comma-separated lm-eval task names; fedhello_heldout (the run's test split) "
        "is always available",
    )  # fmt: skip
    ev.add_argument(
        "--include", action="append", default=[], metavar="DIR",
        help="a folder of lm-eval task YAML files (repeatable)",
    )  # fmt: skip
    ev.add_argument("--limit", type=int, metavar="N", help="score at most N examples per task")
    ev.add_argument(
        "--batch-size", type=int, metavar="B",
        help="examples per batch (default: the run's train.eval_batch_size)",
    )  # fmt: skip
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    cal = sub.add_parser(
        "calibrate", help="measure (or show the stored) cost of each layer depth on this device"
    )
    config_args(cal)
    cal.add_argument(
        "--steps", type=int, default=5,
        help="timed steps per entry, after warm-up (default 5; a profile of fewer is not stored)",
    )  # fmt: skip
    cal.add_argument(
        "--remeasure", action="store_true", help="measure again even if a profile is stored"
    )
    cal.add_argument("--json", action="store_true", help="print one JSON object")
    env = sub.add_parser(
        "env", help="what fedhello will use here: versions, devices, device/precision, data"
    )
    config_args(env)
    env.add_argument("--json", action="store_true", help="print one JSON object")
    for sp in (cmp, rep):
        sp.add_argument(
            "--baseline",
            help="strategy the paired differences are taken against (default: fedra, else full)",
        )
    return p


def _setup_output(verbose: bool, allow_download: bool = False, deterministic: bool = False) -> None:
    """Environment and logging for a command that loads models (the CLI's to set), and the
    process's deterministic mode where the config asks for it (``train.deterministic``:
    process-wide, so the entry point's to set, before any GPU work)."""
    apply_offline_env(allow_download)
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
    if deterministic:
        from fedhello.model.determinism import configure_process

        configure_process(True)


# HOST:PORT, the host a name, an IPv4 address or a bracketed IPv6 one
SUPERLINK_FORM = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):\d{1,5}")


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    import fedhello
    from fedhello.api import run_dir_for
    from fedhello.core.config import load_config, load_saved_config
    from fedhello.progress import RichObserver, summary_table
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
    _setup_output(
        args.verbose,
        cfg is not None and cfg.model.allow_download,
        cfg is not None and cfg.train.deterministic,
    )
    console = Console(stderr=True)
    done = len(run_dir.read_metrics()) if args.resume else 0
    rounds = cfg.federation.rounds if cfg is not None else 0
    summary = fedhello.run(
        None if args.resume else cfg,
        None if args.resume else run_dir.path,
        engine=args.engine,
        resume=args.resume,
        overwrite=args.overwrite,
        observer=RichObserver(console, rounds, done),
        superlink=args.superlink,
        root_certificates=args.root_certificates,
    )
    Console().print(summary_table(summary, str(run_dir.path)))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from fedhello.api import load_config  # the core's checks and the task kind's

    cfg = load_config(args.config, args.overrides)
    note = cfg.allocation.foreign_note()
    if note:
        print(f"fedhello: warning: {note}", file=sys.stderr)
    sys.stdout.write(cfg.to_toml())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    import fedhello
    from fedhello.core.allocation import strategy_class
    from fedhello.core.config import load_config
    from fedhello.planner import render_plan

    cfg = load_config(args.config, args.overrides)
    limited = cfg.clients.real_limits or cfg.clients.upload_mb is not None
    if strategy_class(cfg.allocation.strategy).uses_fisher or limited:  # builds the model
        _setup_output(args.verbose, cfg.model.allow_download, cfg.train.deterministic)
    plan = fedhello.plan(cfg, args.rounds)
    if args.json:
        sys.stdout.write(json.dumps(plan) + "\n")
    else:
        render_plan(plan, Console())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    import fedhello
    from fedhello.core.config import load_config
    from fedhello.progress import RichObserver

    cfg = load_config(args.config, args.overrides)
    _setup_output(args.verbose, cfg.model.allow_download, cfg.train.deterministic)
    logging.getLogger("fedhello").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    console = Console(stderr=True)

    def on_cell(cell: Any, i: int, n: int) -> RichObserver:
        console.rule(f"[{i + 1}/{n}] {cell.partition} / {cell.strategy} / seed {cell.seed}")
        return RichObserver(console, cfg.federation.rounds, quiet=True)

    result = fedhello.compare(
        cfg, args.strategies, args.seeds, args.partitions, args.out, baseline=args.baseline,
        on_cell=on_cell, on_done=lambda cell, outcome: console.print(f"  {outcome}"),
    )  # fmt: skip
    out = Path(result["out"])
    Console().print((out / "results.md").read_text())
    Console().print((out / "paired.md").read_text())
    console.print(f"tables and {len(result['plots'])} plots in {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedhello.studies.report import write_report

    out = Path(args.out) if args.out else Path(args.path)
    result = write_report(Path(args.path), out, baseline=args.baseline)
    print((out / "results.md").read_text(), end="")
    print((out / "paired.md").read_text(), end="")
    print(f"{len(result['plots'])} plots in {out / 'plots'}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedhello.export import check_export, export_merged, needs_remote_code

    _setup_output(args.verbose)
    check_export(Path(args.run_dir), Path(args.merged), args.overwrite)  # before heavy imports
    loader = export_merged(Path(args.run_dir), Path(args.merged), args.overwrite)
    remote = ", trust_remote_code=True" if needs_remote_code(Path(args.merged)) else ""
    print(f"merged model in {args.merged}: load it with "
          f"transformers.{loader}.from_pretrained({args.merged!r}{remote})")  # fmt: skip
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import contextlib
    import json

    from rich.console import Console
    from rich.table import Table

    from fedhello.lm_eval_run import check_eval, evaluate_run, score_rows

    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: allowed: a positive number of examples")
    _, cfg, _ = check_eval(Path(args.run_dir), args.lm_eval, args.include)  # refusals first
    _setup_output(args.verbose, cfg.model.allow_download)
    if not args.verbose:  # lm-eval warns about every task default it fills in
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()  # lm-eval reads each task's data through datasets
    with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints its progress notes
        result = evaluate_run(
            Path(args.run_dir), args.lm_eval, args.include, args.limit, args.batch_size
        )
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    table = Table(title=f"lm-eval {result['lm_eval_version']} on {result['model']}")
    for column in ("task", "metric", "value", "stderr", "examples"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, metric, value, err, n in score_rows(result):
        table.add_row(task, metric, f"{value:.4f}", "" if err is None else f"{err:.4f}",
                      "" if n is None else str(n))  # fmt: skip
    Console().print(table)
    print(f"results in {Path(args.run_dir) / 'lm-eval' / 'results.json'}", file=sys.stderr)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    import fedhello
    from fedhello.calibration import render_profile
    from fedhello.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: allowed: at least 1")
    _setup_output(args.verbose, cfg.model.allow_download, cfg.train.deterministic)
    result = fedhello.calibrate(cfg, steps=args.steps, remeasure=args.remeasure)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        render_profile(result, Console())
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    import json

    from fedhello.core.config import load_config
    from fedhello.machine import describe

    cfg = load_config(args.config, args.overrides)
    _setup_output(args.verbose, cfg.model.allow_download)
    report = describe(cfg)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"platform   {report['platform']}")
    print("versions   " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    for dev in report["devices"]:
        facts = ", ".join(f"{k} {v}" for k, v in dev.items() if k not in ("device", "name"))
        print(f"device     {dev['device']}: {dev['name']} ({facts})")
    res = report["resolved"]
    conf = res["configured"]
    asked = f"train.device = {conf['device']!r}, train.precision = {conf['precision']!r}"
    if "error" in res:
        print(f"resolved   {asked}: cannot run here: {res['error']}")
    else:
        print(f"resolved   {asked} -> {res['device']}, {res['precision']} "
              f"(frozen base in {res['base_precision']}): {res['precision_reason']}")  # fmt: skip
    th = report["threads"]
    print(f"threads    torch {th['torch']} of {th['cpu_cores']} cores; "
          f"run.threads = {th['run.threads']}")  # fmt: skip
    for what in ("model", "data"):
        item = report["offline"][what]
        state = item["source"] if item["available"] else f"NOT available: {item['reason']}"
        print(f"{what:<10} {state}")
    flwr = report["flwr"] or "not found (neither beside this Python nor on PATH)"
    print(f"flwr       {flwr}; "
          f"hub {'offline' if report['offline']['hub_offline'] else 'online'}")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    apply_offline_env(allow_download=True)  # the hub variables: once the config is known
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        commands = {
            "run": cmd_run, "validate": cmd_validate, "plan": cmd_plan,
            "compare": cmd_compare, "report": cmd_report, "export": cmd_export,
            "env": cmd_env, "calibrate": cmd_calibrate, "eval": cmd_eval,
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
