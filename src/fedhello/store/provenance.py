"""What computed a run: the code (fedhello's version and, from a git checkout, its commit) and
the libraries whose arithmetic the numbers depend on, written into every ``summary.json``.

A comparison reuses a finished cell when its outcome-relevant config is the same; a behaviour
change that keeps the same keys (a fixed default, a changed resolution rule) would still mix
two versions of the code in one table without a trace. With the commit beside every cell, the
report says which code made its rows and warns when they come from more than one
(``fedhello.studies.report``). Nothing here needs torch: the versions are read from the
installed distributions' metadata.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# the libraries a run's numbers depend on (their kernels, models, adapters, federation)
LIBRARIES = ("torch", "transformers", "peft", "flwr")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git(folder: Path, *args: str) -> str | None:
    """``git -C folder args``'s output, None where git is missing or fails (no checkout)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_commit(package_dir: Path | None = None) -> tuple[str | None, bool | None]:
    """The commit fedhello's source was checked out at, and whether that source differs from
    it (tracked files modified); (None, None) for an installed copy. The package's own
    ``__init__.py`` must be tracked there: an installed copy inside some other checkout (a
    virtual environment in a project folder) is not that checkout's code."""
    folder = package_dir or Path(__file__).resolve().parents[1]
    if not _git(folder, "ls-files", "--error-unmatch", "__init__.py"):
        return None, None
    commit = _git(folder, "rev-parse", "HEAD")
    status = _git(folder, "status", "--porcelain", "--untracked-files=no", ".")
    return commit, (None if status is None else bool(status))


def code_provenance() -> dict[str, Any]:
    """``summary.json``'s ``code``: fedhello's version, commit and whether its source was
    modified from that commit, and the versions of the libraries in ``LIBRARIES``."""
    commit, modified = git_commit()
    return {
        "fedhello": _version("fedhello"),
        "commit": commit,
        "modified": modified,
        **{name: _version(name) for name in LIBRARIES},
    }


def code_label(code: dict[str, Any] | None) -> str:
    """A summary's ``code`` in a few words: ``abc1234`` (``abc1234+modified``), or the
    version for an installed copy; ``unrecorded`` for a run written before it was kept."""
    if not code:
        return "unrecorded"
    commit = code.get("commit")
    if not commit:
        return f"fedhello {code.get('fedhello')}"
    return commit[:7] + ("+modified" if code.get("modified") else "")
