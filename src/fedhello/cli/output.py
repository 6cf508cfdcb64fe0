"""The process's setup for a command that loads models: logging, the offline hub, warnings and
the deterministic mode (process-wide, so the entry point's to set, never library code's)."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

from fedhello.environment import apply_offline_env

if TYPE_CHECKING:
    from fedhello.core.config import Config

# The command's own notes: shown at INFO whatever the library's level (``main`` sets it).
logger = logging.getLogger("fedhello.cli")


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
    # huggingface_hub and datasets give their loggers a handler of their own at import and
    # still pass each record on to the root's handler above: every warning of theirs (a hub
    # request retried) was printed twice. Theirs alone prints it, as transformers' loggers do
    # (they propagate nothing); set on the logger by name, so it holds whenever they load.
    for library in ("huggingface_hub", "datasets"):
        logging.getLogger(library).propagate = False
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


def note_defaults(cfg: Config, config: str | None, comparison: bool = False) -> None:
    """One INFO line when no CONFIG was given: the command uses fedhello's built-in defaults
    (FedRA, 1,000 evaluation examples, ...), which published configs rely on, not the default
    experiment ``make run`` runs (Fed-HeLLo, ``configs/default.toml``), which a user following
    ``fedhello plan --set ...`` would otherwise take them for. The line names the strategy and
    the run's name; a comparison's come from ``--strategies`` and each cell, so not there."""
    if config is not None:
        return
    which = (
        ""
        if comparison
        else f" (allocation.strategy = {cfg.allocation.strategy!r}, run name {cfg.run_name()!r})"
    )
    logger.info(
        "no CONFIG given: fedhello's built-in defaults%s, not the default experiment that make "
        "run runs (Fed-HeLLo): pass configs/default.toml as CONFIG for that", which,
    )  # fmt: skip
