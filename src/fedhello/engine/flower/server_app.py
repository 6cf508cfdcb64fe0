"""The fedhello ServerApp: the shared run loop, with clients reached as Flower messages.

``make_server_app`` builds one around a config and run directory (Flower simulation, started
by ``fedhello run --engine flower-sim``). The module-level ``app`` is the same for a real
deployment (``flwr run``), reading ``config`` (a TOML path, empty for the defaults),
``run-dir`` and ``overwrite`` from the run config.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

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

    A node's declared ``budget-layers`` replaces the tier budget of its partition."""
    cfg = exp.cfg
    deadline = time.monotonic() + cfg.federation.node_wait
    nodes = list(grid.get_node_ids())
    while len(nodes) < cfg.clients.num_clients and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    if not nodes:
        raise UserError(
            f"no SuperNode connected within federation.node_wait = {cfg.federation.node_wait} s"
        )
    queries = [
        Message(
            RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY
        )
        for n in nodes
    ]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=cfg.federation.node_wait):
        if reply.has_error():
            logger.warning(
                "node %d did not answer the query: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            continue
        info = reply.content.config_records["config"]
        pid = int(info["partition-id"])
        if not 0 <= pid < cfg.clients.num_clients:
            k = cfg.clients.num_clients
            raise UserError(
                f"a SuperNode declared partition-id={pid}; allowed: 0..{k - 1} "
                f"(clients.num_clients = {k})"
            )
        if pid in node_of:
            raise UserError(f"two SuperNodes declared partition-id={pid}")
        node_of[pid] = reply.metadata.src_node_id
        if "budget-layers" in info:
            budget = int(info["budget-layers"])
            if not 1 <= budget <= exp.num_layers:
                raise UserError(
                    f"partition {pid}: budget-layers={budget}; allowed: 1..{exp.num_layers}"
                )
            exp.budgets[pid] = budget
            exp.strategy.budgets[pid] = budget
    logger.info("nodes by partition id: %s; budgets %s", sorted(node_of), exp.budgets)
    return node_of


def serve(
    grid: Grid, cfg: Config, run: RunDir, observer: Any = None, overwrite: bool = False
) -> dict[str, Any]:
    """Run the federation over ``grid`` into ``run``."""
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

    return run_federation(cfg, run, trainer, observer, overwrite, False, "flower", prepare)


def make_server_app(
    cfg: Config, run: RunDir, observer: Any = None, overwrite: bool = False
) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, cfg, run, observer, overwrite)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = load_config(str(rc["config"]) if rc.get("config") else None)
    serve(
        grid,
        cfg,
        RunDir(str(rc.get("run-dir", "runs/flower"))),
        overwrite=bool(rc.get("overwrite", False)),
    )
