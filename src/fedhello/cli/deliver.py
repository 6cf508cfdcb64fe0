"""``fedhello export`` and ``eval``: a finished run as a standalone model, and that model
scored by lm-eval's tasks."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedhello.cli.output import setup_output
from fedhello.core.errors import UserError


def cmd_export(args: argparse.Namespace) -> int:
    from fedhello.export import check_export, export_merged, needs_remote_code

    setup_output(args.verbose)
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
    setup_output(args.verbose, cfg.model.allow_download)
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
