"""The process's setup for a command that loads models: logging, the offline hub, warnings and
the deterministic mode (process-wide, so the entry point's to set, never library code's)."""

from __future__ import annotations

import logging
import warnings

from fedhello.environment import apply_offline_env


def setup_output(verbose: bool, allow_download: bool = False, deterministic: bool = False) -> None:
    """Environment and logging for a command that loads models (the CLI's to set), and the
    process's deterministic mode where the config asks for it (``train.deterministic``:
    process-wide, so the entry point's to set, before any GPU work)."""
    apply_offline_env(allow_download)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("fedhello").setLevel(logging.DEBUG if verbose else logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # `validate` and `plan` may run without the heavy stack
        pass
    if deterministic:
        from fedhello.model.determinism import configure_process

        configure_process(True)
