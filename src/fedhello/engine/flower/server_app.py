"""The fedhello ServerApp: the shared run loop, with clients reached as Flower messages.

``make_server_app`` builds one around a config and run directory (Flower simulation, started
by ``fedhello run --engine flower-sim``). The module-level ``app`` is the same for a real
deployment (``flwr run``), reading ``config`` (a TOML path, empty for the defaults),
``run-dir``, ``overwrite`` and ``resume`` from the run config.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedhello.budgets import tier_layers
from fedhello.config import Config, load_config
from fedhello.engine.core import RoundPlan, State, run_federation
from fedhello.engine.flower.strategy import HelloFedAvg
from fedhello.errors import UserError
from fedhello.experiment import Experiment
from fedhello.runs import RunDir
from fedhello.training import ClientResult

logger = logging.getLogger(__name__)


def discover_nodes(grid: Grid, exp: Experiment) -> dict[int, int]:
    """Ask every node its partition id (and budget) once; returns partition id -> node id.

    Waits up to ``federation.node_wait`` seconds for ``clients.num_clients`` nodes to connect
    and answer (a node's ClientApp may take a while to start). A node's declared
    ``budget-layers`` replaces the tier budget of its partition. The query carries the run's
    config, so that a node with its own data file checks it before the first round."""
    cfg = exp.cfg
    config_toml = cfg.to_toml()
    deadline = time.monotonic() + cfg.federation.node_wait
    node_of: dict[int, int] = {}
    answered: set[int] = set()
    while len(node_of) < cfg.clients.num_clients and time.monotonic() < deadline:
        pending = [n for n in grid.get_node_ids() if n not in answered]
        if not pending:
            time.sleep(0.5)
            continue
        queries = [
            Message(RecordDict({"config": ConfigRecord({"fedhello-config": config_toml})}),
                    dst_node_id=n,
                    message_type=MessageType.QUERY)
            for n in pending
        ]  # fmt: skip
        timeout = max(1.0, deadline - time.monotonic())
        for reply in grid.send_and_receive(queries, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning("node %d did not answer the query: %s", node, reply.error.reason)
                continue
            answered.add(node)
            register_node(exp, node_of, node, reply.content.config_records["config"])
    if not node_of:
        raise UserError(
            f"no SuperNode answered within federation.node_wait = {cfg.federation.node_wait} s"
        )
    missing = sorted(set(range(cfg.clients.num_clients)) - set(node_of))
    if missing:
        logger.warning("no SuperNode for partitions %s: they will be recorded as failed", missing)
    logger.info("nodes by partition id: %s; budgets %s", sorted(node_of), exp.budgets)
    return node_of


def register_node(exp: Experiment, node_of: dict[int, int], node: int, info: Any) -> None:
    k = exp.cfg.clients.num_clients
    pid = int(info["partition-id"])
    if not 0 <= pid < k:
        raise UserError(
            f"a SuperNode declared partition-id={pid}; allowed: 0..{k - 1} "
            f"(clients.num_clients = {k})"
        )
    if pid in node_of and node_of[pid] != node:
        raise UserError(f"two SuperNodes declared partition-id={pid}")
    node_of[pid] = node
    if "data-error" in info:  # the node's own data file is unusable: stop before round 1
        raise UserError(f"partition {pid}: {info['data-error']}")
    if "site-examples" in info:
        logger.info("partition %d trains on its own data: %d examples", pid, info["site-examples"])
    if "budget-tier" in info:  # a tier of clients.tiers, as in the embedded engine
        tier = int(info["budget-tier"])
        tiers = exp.cfg.clients.tiers
        if not 0 <= tier < len(tiers):
            raise UserError(f"partition {pid}: budget-tier={tier}; allowed: 0..{len(tiers) - 1}")
        budget = tier_layers(tiers[tier], exp.num_layers, exp.cfg.clients.tier_kind)
        exp.budgets[pid] = exp.strategy.budgets[pid] = budget
        exp.tiers[pid] = tier
    if "budget-layers" in info:
        budget = int(info["budget-layers"])
        if not 1 <= budget <= exp.num_layers:
            raise UserError(
                f"partition {pid}: budget-layers={budget}; allowed: 1..{exp.num_layers}"
            )
        exp.budgets[pid] = budget
        exp.strategy.budgets[pid] = budget


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
    holder: dict[str, HelloFedAvg] = {}

    def prepare(exp: Experiment) -> None:
        holder["strategy"] = HelloFedAvg(exp, discover_nodes(grid, exp), cfg.federation.min_replies)

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

    return run_federation(cfg, run, trainer, observer, overwrite, resume, "flower", prepare)


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
