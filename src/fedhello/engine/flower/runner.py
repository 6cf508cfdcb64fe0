"""Start a federation on Flower: its simulation engine, or a running SuperLink.

``run_flower_sim`` runs the ServerApp in this process and the ClientApps in Flower's
simulation engine (Ray), one virtual SuperNode per client with ``partition-id`` set, each with
the CPU cores and GPU share of ``simulation.simulation_resources``.
``run_flower_deployment`` submits the app to a SuperLink with ``flwr run``: the ServerApp runs
beside the SuperLink, the ClientApps on the SuperNodes (see the README's deployment guide).
The app needs no code of its own: every node imports fedhello from its environment, so the
submitted app folder is generated: a ``pyproject.toml`` naming the components.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedhello.core.config import Config
from fedhello.core.errors import UserError
from fedhello.engine.core import RunOptions
from fedhello.engine.flower.simulation import simulation_resources
from fedhello.environment import find_program, program_env
from fedhello.store.runs import RunDir

logger = logging.getLogger(__name__)

# the server's own work in a round beyond waiting for replies (evaluation, Fisher scores, a
# language model's generation on a CPU): generous, the bound is against a hang, not a pace
SERVER_WORK_S = 3600.0

# flwr's message (flwr.cli.utils.SUPERLINK_UNAVAILABLE_MESSAGE) when it cannot reach the
# SuperLink: also what a plain-text connection to a TLS SuperLink gets
UNAVAILABLE = "Connection to the SuperLink is unavailable"

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedhello-app"
version = "0.1.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedhello"

[tool.flwr.app.components]
serverapp = "fedhello.engine.flower.server_app:app"
clientapp = "fedhello.engine.flower.client_app:app"

[tool.flwr.app.config]
config = ""
run-dir = "runs/flower"
overwrite = false
resume = false
"""


def run_flower_sim(cfg: Config, run: RunDir, options: RunOptions | None = None) -> dict[str, Any]:
    """Run the federation in Flower's simulation engine, one virtual SuperNode per client."""
    from flwr.simulation import run_simulation

    from fedhello.engine.experiment import DataCache, check_data
    from fedhello.engine.flower.client_app import app as client_app
    from fedhello.engine.flower.server_app import make_server_app
    from fedhello.model.accelerator import accelerator_for

    opts = options or RunOptions()
    cache = opts.cache or DataCache()  # the ServerApp below runs in this process: it reuses it
    opts = replace(opts, cache=cache)
    check_data(cfg, cache)  # bad data is one line before Ray starts, not after
    accelerator_for(cfg)  # a device or precision this machine lacks: one line, before Ray
    resources = simulation_resources(cfg)
    logger.info("Flower simulation: %s", resources.describe())
    outcome: dict[str, Any] = {}
    server = make_server_app(cfg, run, opts, outcome)
    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=cfg.clients.num_clients,
        backend_config=resources.backend_config(),
    )
    if "error" in outcome:
        raise outcome["error"]
    if not run.summary_path.is_file():
        raise RuntimeError("the Flower simulation ended without finishing the run")
    return run.read_summary()


def write_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder


def flwr_home_entry(
    home: Path, name: str | None, address: str, root_certificates: str | None
) -> str:
    """The name of a connection entry in ``$FLWR_HOME/config.toml`` (how flwr 1.41 finds a
    SuperLink) for ``address`` with this TLS setting, written if missing. Unless ``name`` is
    given, the name carries the setting (insecure, or a hash of the CA path): an entry written
    for another one is never reused, which would connect in plain text to a TLS SuperLink or
    with an old CA."""
    if name is None:
        tls = root_certificates or "insecure"
        tag = hashlib.sha256(f"{address}|{tls}".encode()).hexdigest()[:8]
        name = "fedhello-" + address.replace(":", "-").replace(".", "-") + "-" + tag
    home.mkdir(parents=True, exist_ok=True)
    lines = [f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates:
        lines.append(f'root-certificates = "{root_certificates}"')
    else:
        lines.append("insecure = true")
    config = home / "config.toml"
    text = config.read_text() if config.is_file() else ""
    if f"[superlink.{name}]" not in text:
        config.write_text(text + ("\n" if text else "") + "\n".join(lines) + "\n")
    return name


def deployment_timeout(cfg: Config) -> float:
    """How long ``flwr run`` may take before fedhello stops waiting: the nodes' wait, then
    round 0 and every round each bounded by the round timeout for the replies plus up to
    ``SERVER_WORK_S`` for the server's own work (evaluation, Fisher scores), and the final
    evaluation (15 rounds at the defaults: 300 + 17 x (600 + 3,600) = 71,700 s, 20 hours)."""
    f = cfg.federation
    return f.node_wait + (f.rounds + 2) * (f.round_timeout + SERVER_WORK_S)


def stream(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``cmd``, logging its output line by line as it comes (a deployment's progress is
    flwr's stream); its exit code (None: still running after ``timeout`` s, then stopped)
    and everything it printed."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
        errors="replace", env=program_env(),
    )  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.strip():
                logger.info("flwr: %s", line.rstrip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    reader.join(timeout=5)
    return code, "".join(lines)


def run_flower_deployment(
    cfg: Config,
    run: RunDir,
    superlink: str,
    root_certificates: str | None = None,
    options: RunOptions | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Submit the federation to the SuperLink at ``superlink`` (its Control API address) and
    wait for it. The ServerApp runs beside the SuperLink and writes ``run`` there; with
    ``options.resume`` it continues ``run`` from its last checkpoint (the ServerApp runs in
    another process: the options' observer and cache do not reach it)."""
    opts = options or RunOptions()
    overwrite, resume = opts.overwrite, opts.resume
    flwr = find_program("flwr")  # beside this Python first: a venv need not be activated
    if flwr is None:
        raise UserError(
            f"the flwr command is neither beside this Python ({sys.executable}) nor on PATH: "
            "install fedhello's dependencies (flwr) into the environment fedhello runs in"
        )
    certificates = None if root_certificates is None else ca_certificate(root_certificates)
    if not resume:
        run.check_free(overwrite)
    timeout = deployment_timeout(cfg) if timeout is None else timeout
    run.path.parent.mkdir(parents=True, exist_ok=True)
    run.error_note.unlink(missing_ok=True)
    # a summary already there (an --overwrite, a finished run resumed) is not this launch's
    before = run.summary_path.stat().st_mtime_ns if run.summary_path.is_file() else None
    stored = run.path.parent / f".{run.path.name}.config.toml"
    with tempfile.TemporaryDirectory(prefix="fedhello-app-") as tmp:
        app_dir = write_app(Path(tmp) / "app")
        stored.write_text(cfg.to_toml())  # the ServerApp reads it after this folder is gone
        home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
        name = flwr_home_entry(home, None, superlink, certificates)
        run_config = (
            f'config="{stored.resolve()}" run-dir="{run.path.resolve()}" '
            f"overwrite={'true' if overwrite else 'false'} "
            f"resume={'true' if resume else 'false'}"
        )
        cmd = [flwr, "run", str(app_dir), name, "--run-config", run_config, "--stream"]
        logger.info("submitting: %s", " ".join(cmd))
        # PATH starts with this Python's directory: what flwr starts comes from here too
        code, output = stream(cmd, timeout)
    if code is None:
        raise UserError(
            f"flwr run did not finish within {timeout:g} s (SuperLink {superlink}); the run may "
            "still be going on the SuperLink: `flwr ls` lists it, `flwr stop` ends it"
        )
    stored.unlink(missing_ok=True)  # read at the ServerApp's start: the run has ended
    if run.error_note.is_file():  # the ServerApp stopped on bad input (a node's data, ...)
        reason = run.error_note.read_text().strip()
        run.error_note.unlink()
        raise UserError(reason)
    written = run.summary_path.is_file() and run.summary_path.stat().st_mtime_ns != before
    if code != 0 or not written:
        reason = flwr_failure(output)
        if root_certificates is None and UNAVAILABLE in reason:
            # a plain-text connection to a TLS SuperLink fails just as an unreachable one
            reason += (
                " If the SuperLink uses TLS, give its CA certificate: --root-certificates "
                "CA.pem (fedhello.run's root_certificates)"
            )
        raise UserError(f"flwr run failed (exit {code}, SuperLink {superlink}): {reason}")
    return run.read_summary()


def ca_certificate(path: str) -> str:
    """The CA certificate as an absolute path (``flwr`` refuses relative ones), checked."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise UserError(
            f"--root-certificates {path!r}: no such file ({resolved}); allowed: the CA "
            "certificate (PEM) that signed the SuperLink's certificate"
        )
    return str(resolved)


def flwr_failure(output: str) -> str:
    """What ``flwr``'s output says went wrong, as one line.

    flwr prints its errors in a box (``╭─ Error ─╮``, lines ``│ ... │``, ``╰─╯``), wrapping a
    message over several lines: the last box's lines are joined. Without a box, the last line
    after a cross mark or naming an error (a Python traceback ends with the exception's line).
    """
    raw = output.splitlines()
    starts = [i for i, line in enumerate(raw) if line.strip().startswith("╭")]
    if starts:
        body = []
        for line in raw[starts[-1] + 1 :]:
            if line.strip().startswith("╰"):
                break
            body.append(line.strip().strip("│┃").strip())
        text = " ".join(" ".join(body).split())
        if text:
            return text[:500]
    lines = [" ".join(line.strip(" │┃|").split()) for line in raw]
    lines = [line for line in lines if line and not set(line) <= set("─━═-+╭╮╰╯┏┓┗┛")]
    marked = [ln for ln in lines if ln.startswith(("❌", "Error", "error")) or "Error:" in ln]
    chosen = marked[-1] if marked else (lines[-1] if lines else "no output")
    return chosen.lstrip("❌ ").strip()[:500]
