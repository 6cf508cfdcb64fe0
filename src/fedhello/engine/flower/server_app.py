"""The fedhello ServerApp: the shared run loop, with clients reached as Flower messages.

``make_server_app`` builds one around a config and run directory (Flower simulation, started
by ``fedhello run --engine flower-sim``). The module-level ``app`` is the same for a real
deployment (``flwr run``), reading ``config`` (a TOML path, empty for the defaults),
``run-dir``, ``overwrite`` and ``resume`` from the run config.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhello.core.config import Config, load_config
from fedhello.core.errors import UserError
from fedhello.engine.core import RunOptions, run_federation
from fedhello.engine.flower.engine import FlowerEngine
from fedhello.model.determinism import configure_process
from fedhello.store.runs import RunDir

logger = logging.getLogger(__name__)


def make_server_app(
    cfg: Config, run: RunDir, options: RunOptions, outcome: dict[str, Any] | None = None
) -> ServerApp:
    """A ServerApp bound to one config and run; an exception lands in ``outcome["error"]``
    (the simulation would otherwise only log it)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(cfg, run, FlowerEngine(grid, run, options.resume), options)
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
        cfg = load_config(str(rc["config"]) if rc.get("config") else None)
        configure_process(cfg.train.deterministic)  # this process is the deployed ServerApp's
        if cfg.run.threads:  # and so are its threads (Fisher scores, evaluation: the server's)
            torch.set_num_threads(cfg.run.threads)
        options = RunOptions(
            overwrite=bool(rc.get("overwrite", False)), resume=bool(rc.get("resume", False))
        )
        with run.writing():  # this process writes the run: one at a time, on this host
            run_federation(cfg, run, FlowerEngine(grid, run, options.resume), options)
    except UserError as err:  # bad input: hand the reason to `fedhello run`, then fail
        run.error_note.parent.mkdir(parents=True, exist_ok=True)
        run.error_note.write_text(str(err))
        raise
