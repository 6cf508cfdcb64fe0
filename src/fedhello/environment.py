"""The process environment fedhello's programs run in: offline by default, quiet libraries.

Library code never changes the environment. The ``fedhello`` command applies these settings
at start-up (``apply_offline_env``), and the test suite and the Flower test harness use the
same table, so the list lives here once. The programs fedhello starts (``flwr``) are looked up
in fedhello's own environment first (``find_program``) and get an environment of their own
(``program_env``), built as a new dict.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

# Never wait on a hub or a telemetry server that cannot be reached (a failed hub lookup
# retries for ~50 s), and keep tokenizers from forking thread pools inside Ray actors.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
# Allowed to reach a hub (model.allow_download = true): the hub variables stay the user's.
HUB_KEYS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def apply_offline_env(allow_download: bool = False) -> None:
    """Set the table's variables that the user has not set (the CLI calls this)."""
    for key, value in OFFLINE_ENV.items():
        if allow_download and key in HUB_KEYS:
            continue
        os.environ.setdefault(key, value)


def interpreter_dir() -> Path | None:
    """The directory of the running Python, where its environment's programs are installed
    (a venv's ``bin/`` or ``Scripts/``); None when the interpreter is unknown (embedded)."""
    return Path(sys.executable).parent if sys.executable else None


def find_program(name: str) -> str | None:
    """The program ``name`` of the environment fedhello runs in: beside the running Python
    first, then on PATH. ``.venv/bin/fedhello`` runs without the venv being activated, so PATH
    alone misses the venv's ``flwr``, or finds another environment's (of another version)."""
    here = interpreter_dir()
    found = shutil.which(name, path=str(here)) if here is not None else None
    return found or shutil.which(name)


def program_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a program fedhello starts: ``base`` (default: this process's), with
    the running Python's directory first on PATH, so that what that program starts in its turn
    (``flwr`` starts ``flwr-serverapp``, ``flower-superlink``, ``flwr-clientapp``, ...) comes
    from fedhello's environment too. A new dict: this process's environment is left alone."""
    env = dict(os.environ if base is None else base)
    here = interpreter_dir()
    if here is not None:
        rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != str(here)]
        env["PATH"] = os.pathsep.join([str(here), *rest])
    return env
