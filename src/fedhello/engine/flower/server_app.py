"""The fedhello ServerApp: the shared run loop, with clients reached as Flower messages.

``make_server_app`` builds one around a config and run directory (Flower simulation, started
by ``fedhello run --engine flower-sim``). The module-level ``app`` is the same for a real
deployment (``flwr run``), reading ``config`` (a TOML path, empty for the defaults),
``run-dir``, ``overwrite`` and ``resume`` from the run config.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhello.config import Config, load_config
from fedhello.engine.core import RoundPlan, State, run_federation
from fedhello.engine.flower.discovery import discover_nodes
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
