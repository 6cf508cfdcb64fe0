"""The fedhello ServerApp: the shared run loop, with clients reached as Flower messages.

``make_server_app`` builds one around a config and run directory (Flower simulation, started
by ``fedhello run --engine flower-sim``). The module-level ``app`` is the same for a real
deployment (``flwr run``), reading ``config`` (a TOML path, empty for the defaults),
``run-dir``, ``overwrite`` and ``resume`` from the run config.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedhello.config import Config, load_config
from fedhello.engine.core import RoundPlan, State, run_federation
from fedhello.engine.flower.discovery import discover_nodes
from fedhello.engine.flower.records import to_record
from fedhello.engine.flower.strategy import HelloFedAvg
from fedhello.errors import UserError
from fedhello.experiment import Experiment
from fedhello.runs import RunDir
from fedhello.training import ClientResult

logger = logging.getLogger(__name__)


def serve(
    grid: Grid,
    cfg: Config,
    run: RunDir,
    observer: Any = None,
    overwrite: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the federation over ``grid`` into ``run`` (``resume``: from its last checkpoint,
    whichever engine wrote it: the checkpoint holds the whole server state)."""
    holder: dict[str, Any] = {}

    def prepare(exp: Experiment) -> None:
        node_of, holder["sites"] = discover_nodes(grid, exp)
        holder["strategy"] = HelloFedAvg(exp, node_of, cfg.federation.min_replies)

    def trainer(
        exp: Experiment, rp: RoundPlan, state: State, obs: Any
    ) -> tuple[list[ClientResult], dict[int, str]]:
        strategy = holder["strategy"]
        messages, failed = strategy.messages_for(rp, state)
        replies = (
            grid.send_and_receive(messages, timeout=cfg.federation.round_timeout)
            if messages
            else []
        )
        results, more_failed = strategy.collect(rp, replies, state)
        failed |= more_failed
        if len(results) < cfg.federation.min_replies:
            logger.warning(
                "round %d: %d replies, fewer than federation.min_replies = %d: model unchanged",
                rp.round, len(results), cfg.federation.min_replies,
            )  # fmt: skip
            failed |= {r.update.client: "round below federation.min_replies" for r in results}
            results = []
        for r in results:
            obs.on_client_end(rp.round, r)
        return results, failed

    def final_extra(exp: Experiment, state: State) -> dict[str, Any]:
        if not holder["sites"]:
            return {}
        return evaluate_sites(grid, exp, state, holder["strategy"].node_of, holder["sites"])

    return run_federation(
        cfg, run, trainer, observer, overwrite, resume, "flower", prepare, final_extra
    )


def evaluate_sites(
    grid: Grid, exp: Experiment, state: State, node_of: dict[int, int], sites: dict[int, str]
) -> dict[str, Any]:
    """The final global model on each site's held-out rows, evaluated on the site (its data
    never leaves it): per-site scores, and their example-weighted mean accuracy."""
    arrays, config_toml = to_record(state), exp.cfg.to_toml()
    messages = [
        Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
                    {"fedhello-config": config_toml, "client": client,
                     "label-names": list(exp.raw.label_names)})}),
                dst_node_id=node_of[client], message_type=MessageType.EVALUATE)
        for client in sorted(sites) if client in node_of
    ]  # fmt: skip
    client_of = {node: client for client, node in node_of.items()}
    scores: dict[str, dict[str, Any]] = {}
    for reply in grid.send_and_receive(messages, timeout=exp.cfg.federation.round_timeout):
        client = client_of.get(reply.metadata.src_node_id)
        if client is None:
            continue
        if reply.has_error():
            scores[str(client)] = {"error": reply.error.reason}
            continue
        metrics = reply.content.metric_records.get("metrics", {})
        scores[str(client)] = {k.replace("-", "_"): v for k, v in metrics.items()}
    for client in sites:
        scores.setdefault(str(client), {"error": "no reply before federation.round_timeout"})
    for client, s in sorted(scores.items()):
        if "error" in s:
            logger.warning("site %s could not evaluate the final model: %s", client, s["error"])
    scored = [s for s in scores.values() if s.get("num_examples")]
    total = sum(int(s["num_examples"]) for s in scored)
    out: dict[str, Any] = {
        "site_validation": dict(sorted(scores.items(), key=lambda kv: int(kv[0])))
    }
    if total:
        mean = sum(float(s["accuracy"]) * int(s["num_examples"]) for s in scored) / total
        out |= {"site_validation_accuracy": mean, "site_validation_examples": total}
    return out


def make_server_app(
    cfg: Config,
    run: RunDir,
    observer: Any = None,
    overwrite: bool = False,
    outcome: dict[str, Any] | None = None,
    resume: bool = False,
) -> ServerApp:
    """A ServerApp bound to one config and run; an exception lands in ``outcome["error"]``
    (the simulation would otherwise only log it)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            serve(grid, cfg, run, observer, overwrite, resume)
        except Exception as err:
            if outcome is None:
                raise
            outcome["error"] = err

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    run = RunDir(str(rc.get("run-dir", "runs/flower")))
    try:
        serve(
            grid,
            load_config(str(rc["config"]) if rc.get("config") else None),
            run,
            overwrite=bool(rc.get("overwrite", False)),
            resume=bool(rc.get("resume", False)),
        )
    except UserError as err:  # bad input: hand the reason to `fedhello run`, then fail
        run.error_note.parent.mkdir(parents=True, exist_ok=True)
        run.error_note.write_text(str(err))
        raise
