"""``fedhello validate``, ``plan``, ``calibrate`` and ``env``: what a config resolves to, which
layers it would allocate, what a layer costs on this machine, and what this machine has."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from fedhello.cli.output import note_defaults, setup_output
from fedhello.core.errors import UserError

if TYPE_CHECKING:
    pass


def cmd_validate(args: argparse.Namespace) -> int:
    """The config resolved, after every check that needs no model, data or device: the
    schema, the settings' combinations (the task kind's included) and the DP budget's
    accountant; local model and data paths that do not exist here are warnings (the config may
    be meant for another machine). The devices are ``fedhello env``'s to check."""
    from fedhello.api import load_config  # the core's checks and the task kind's
    from fedhello.engine.preflight import missing_paths
    from fedhello.engine.privacy import start as privacy_start

    cfg = load_config(args.config, args.overrides)
    privacy_start(cfg)  # a target epsilon round 1 already exceeds: refused as by plan and run
    here = "a run on this machine would stop there"
    paths = [f"{err}; {here}" for err in missing_paths(cfg)]
    for note in (cfg.allocation.foreign_note(), *paths):
        if note:
            print(f"fedhello: warning: {note}", file=sys.stderr)
    note_defaults(cfg, args.config)
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
        setup_output(args.verbose, cfg.model.allow_download, cfg.train.deterministic)
    plan = fedhello.plan(cfg, args.rounds)
    note_defaults(cfg, args.config)  # once it can be planned: an error stays the only line
    if args.json:
        sys.stdout.write(json.dumps(plan) + "\n")
    else:
        render_plan(plan, Console())
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
    setup_output(args.verbose, cfg.model.allow_download, cfg.train.deterministic)
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
    setup_output(args.verbose, cfg.model.allow_download)
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
