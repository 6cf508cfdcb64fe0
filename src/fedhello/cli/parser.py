"""The ``fedhello`` command's arguments: one subcommand per thing a user does."""

from __future__ import annotations

import argparse

from fedhello.api import ENGINES

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

CACHE_HELP = (
    "keep train.head = 'class-means' round 0 (every client's class sums) in DIR and reuse it "
    "in any later run with the same model, input batches, seed, machine and arithmetic "
    "(embedded engine): on a CPU the metrics are those the run would compute"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedhello", description=DESCRIPTION)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def config_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "config", nargs="?",
            help="TOML config (default: fedhello's built-in defaults, which are not the default "
            "experiment of make run: that is configs/default.toml)",
        )  # fmt: skip
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
    run.add_argument("--cache-dir", metavar="DIR", help=CACHE_HELP)

    val = sub.add_parser("validate", help="check a config and print it resolved")
    config_args(val)

    plan = sub.add_parser("plan", help="show the layer allocation without training")
    config_args(plan)
    plan.add_argument("--rounds", type=int, help="rounds to plan (default: federation.rounds)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")

    cmp = sub.add_parser("compare", help="paired runs of strategies over seeds and partitions")
    config_args(cmp)
    cmp.add_argument(
        "--strategies", default="all",
        help="comma-separated names (name:shape), or all: every built-in strategy except "
        "deepest-fit, geometric under four shapes, plus fedra-subnetwork (default: all)",
    )  # fmt: skip
    cmp.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    cmp.add_argument(
        "--partitions", help="comma-separated: iid,pathological,dirichlet (default: config's)"
    )
    cmp.add_argument(
        "--out",
        help="comparison folder (default: RUN.OUT_DIR/compare-<run.name>, compare-default when "
        "run.name is unset)",
    )
    cmp.add_argument("--cache-dir", metavar="DIR", help=CACHE_HELP)

    rep = sub.add_parser(
        "report", help="tables and plots again from saved metrics, or across comparisons"
    )
    rep.add_argument(
        "path", nargs="+",
        help="a comparison folder or a run directory; several comparison folders: one paired "
        "table and forest plot across them (regimes.md, regimes.csv, regimes.png in --out)",
    )  # fmt: skip
    rep.add_argument(
        "--out", help="where to write (default: the folder itself; required with several)"
    )
    rep.add_argument(
        "--strategies", help="with several folders: only these strategies' rows (comma-separated)"
    )
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
