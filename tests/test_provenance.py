"""Which code computed a run: the commit of a checkout, whether its source was modified, and
nothing claimed for an installed copy that merely sits inside some other checkout."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fedhello.store.provenance import code_label, git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def test_a_checkout_gives_its_commit_and_whether_the_source_was_modified(tmp_path: Path) -> None:
    pkg = tmp_path / "repo" / "src" / "fedhello"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    _git(tmp_path / "repo", "init", "-q")
    _git(tmp_path / "repo", "add", "-A")
    _git(tmp_path / "repo", "commit", "-qm", "one")
    head = _git(tmp_path / "repo", "rev-parse", "HEAD")
    git_commit.cache_clear()
    assert git_commit(pkg) == (head, False)
    (pkg / "__init__.py").write_text("x = 2\n")
    git_commit.cache_clear()
    assert git_commit(pkg) == (head, True)
    git_commit.cache_clear()
    assert code_label({"commit": head, "modified": True}) == head[:7] + "+modified"


def test_an_untracked_copy_inside_a_checkout_claims_no_commit(tmp_path: Path) -> None:
    """A virtual environment inside a project folder: its installed fedhello is not the
    project's code, whatever the project's HEAD."""
    repo = tmp_path / "project"
    repo.mkdir()
    (repo / "README").write_text("a project\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "one")
    pkg = repo / ".venv" / "site-packages" / "fedhello"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    git_commit.cache_clear()
    assert git_commit(pkg) == (None, None)
    git_commit.cache_clear()
    assert code_label({"fedhello": "0.1.0", "commit": None}) == "fedhello 0.1.0"
    assert code_label(None) == "unrecorded"
