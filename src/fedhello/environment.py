"""The process environment fedhello's programs run in: offline by default, quiet libraries.

Library code never changes the environment. The ``fedhello`` command applies these settings
at start-up (``apply_offline_env``), and the test suite and the Flower test harness use the
same table, so the list lives here once.
"""

from __future__ import annotations

import os

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
