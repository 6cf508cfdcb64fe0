"""The run directory: it explains itself.

runs/<name>/config.toml     the resolved config (every default spelled out)
runs/<name>/metrics.jsonl   one JSON object per round
runs/<name>/summary.json    final full-test metrics, wall time, totals, numerics version
runs/<name>/adapter/        PEFT adapter (LoRA + head): PeftModel.from_pretrained(base, here)
runs/<name>/profile.json    the cost profile its limits were checked with (real-unit limits)
runs/<name>/sites.json      a Flower run's client id of each site that gave only data= (resume)
runs/.<name>.lock           held by the one process writing the run (beside it: a fresh run
                            replaces its directory while holding the lock)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from fedhello.core.config import Config
from fedhello.core.errors import RunDirError
from fedhello.core.numerics import recorded_version
from fedhello.store.checkpoint import checkpoint_machine, checkpoint_numerics

logger = logging.getLogger(__name__)

# What a run records of its resolved precision (summary.json and every round's record).
PRECISION_KEYS = ("precision", "base_precision")


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def profile_path(self) -> Path:
        """The cost profile the run checked its clients' limits with (real-unit limits only)."""
        return self.path / "profile.json"

    @property
    def sites_path(self) -> Path:
        """A Flower run's client id of each site that declared only its data path, fixed on
        the first start so that a resume gives every site the same id (its seeds, budget)."""
        return self.path / "sites.json"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def error_note(self) -> Path:
        """Where a deployed ServerApp leaves the one-line reason it stopped on bad input, for
        ``fedhello run`` to show (the ServerApp runs in another process, beside the SuperLink)."""
        return self.path.parent / f".{self.path.name}.error"

    @property
    def lock_path(self) -> Path:
        """The lock of the one process writing this run. Beside the run, not in it: a fresh
        run replaces its directory while holding the lock. From the resolved path, so a run
        reached through a symlink (two comparisons sharing cells) or as ``.`` has one lock."""
        real = self.path.resolve()
        return real.parent / f".{real.name}.lock"

    @contextmanager
    def writing(self, wait: bool = False) -> Iterator[None]:
        """Hold this run for writing: two processes writing one run would interleave their
        rounds in one metrics.jsonl and overwrite each other's checkpoints (two comparisons
        sharing a folder, a resume beside the run it resumes). Without ``wait`` a held run is
        one line of error at once; with it (a comparison's cell) this process waits for the
        other to finish, then decides again what the cell needs (usually: nothing, reused).
        An OS file lock (``filelock``): a process that dies releases it."""
        check_folder(self.path, "run directory")  # before the lock's folder is made
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.lock_path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise RunDirError(
                    f"run directory {str(self.path)!r} is being written by another fedhello "
                    f"process (it holds {self.lock_path.name}): wait for it to finish, or "
                    "choose another --out"
                ) from None
            logger.warning(
                "%s is being written by another fedhello process: waiting for it to finish",
                self.path,
            )
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def check_free(self, overwrite: bool = False) -> None:
        """Raise unless this directory may be (re)created: call before any long work."""
        check_folder(self.path, "run directory")
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise RunDirError(
                    f"run directory {str(self.path)!r} already exists{self._unfinished()}"
                    "pass --overwrite to replace it, or choose another --out"
                )
            if not self.config_path.is_file():
                raise RunDirError(
                    f"run directory {str(self.path)!r} is not empty and holds no config.toml: "
                    "not a fedhello run, refusing to overwrite it"
                )

    def _unfinished(self) -> str:
        """What the refusal adds after "already exists": for a run without its summary (an
        interrupted one) the command that continues it, else nothing more."""
        if self.summary_path.is_file() or not self.config_path.is_file():
            return ": "
        done = len(self.read_metrics())
        return (f" and holds an unfinished run ({done} round{'s' * (done != 1)} recorded): "
                f"continue it with fedhello run --resume {self.path}, ")  # fmt: skip

    def create(self, overwrite: bool = False) -> None:
        """Make the directory fresh; an existing run is replaced only with ``overwrite``."""
        self.check_free(overwrite)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def write_config(self, cfg: Config) -> None:
        _atomic_write(self.config_path, cfg.to_toml())

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def truncate_metrics(self, last_round: int) -> None:
        """Drop the records of rounds after ``last_round`` (they are recomputed on resume)."""
        keep = [r for r in self.read_metrics() if r["round"] <= last_round]
        _atomic_write(
            self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep)
        )

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rounds recorded so far. A last line that does not parse was cut short by a crash
        (its round is redone on resume) and ends the reading; a bad line with records after it
        is no crash's doing: the file was damaged, and its rounds cannot be trusted."""
        if not self.metrics_path.is_file():
            return []
        path = self.metrics_path
        # undecodable bytes become a line that does not parse, judged like any other
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        records: list[dict[str, Any]] = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if any(later.strip() for later in lines[number:]):
                    raise RunDirError(
                        f"{str(path)!r} line {number} is not valid JSON ({err.msg}) and lines "
                        "follow it: the file is damaged; allowed: one JSON object per line "
                        "(only the last may be cut short by a crash)"
                    ) from None
                break  # a line cut short by a crash: the round is redone
            if not isinstance(record, dict):
                raise RunDirError(
                    f"{str(path)!r} line {number} is {type(record).__name__} JSON, not a "
                    "round's record; allowed: one JSON object per line"
                )
            records.append(record)
        return records

    def recorded_precision(self) -> dict[str, str] | None:
        """``precision`` and ``base_precision`` this run has run in so far (the server's: its
        summary's or its first round's); fp32 for runs written before fedhello had precision
        settings (they all ran in fp32); None for a run with no round yet."""
        records = [] if self.summary_path.is_file() else self.read_metrics()[:1]
        if not self.summary_path.is_file() and not records:
            return None
        source = self.read_summary() if self.summary_path.is_file() else records[0]
        return {k: str(source.get(k, "fp32")) for k in PRECISION_KEYS}

    def recorded_machine(self) -> dict[str, Any]:
        """What this run was computed on, as far as it recorded it: ``device`` (its type:
        cpu, cuda, mps) and ``torch_threads`` (the server's, resolved). A finished run's
        summary holds both (threads since 2026-12-07; ``mixed`` where a resume continued it
        with others); an unfinished one's newest checkpoint holds both (since 2026-12-07),
        its first round its clients' device. Numbers differ between devices and thread
        counts, so a comparison reuses or resumes a cell only on the same."""
        out: dict[str, Any] = {}
        if self.summary_path.is_file():
            summary = self.read_summary()
            if summary.get("device"):
                out["device"] = str(summary["device"]).split(":")[0]
            if summary.get("torch_threads"):
                out["torch_threads"] = int(summary["torch_threads"])
            for key in summary.get("machine_changed", {}).get("what", []):
                out[key] = "mixed"
            return out
        first = self.read_metrics()[:1]
        devices = {
            str(c["device"]).split(":")[0] for r in first for c in r["clients"] if c.get("device")
        }
        if len(devices) == 1:
            out["device"] = devices.pop()
        return out | checkpoint_machine(self.checkpoint_dir)

    def recorded_numerics(self) -> int | None:
        """The numerics version this run's numbers come from (``fedhello.core.numerics``): its
        summary's; for a run that has not finished, its newest checkpoint's (what a resume
        keeps: the rounds after it are recomputed); None with neither (nothing to keep)."""
        if self.summary_path.is_file():
            return recorded_version(self.read_summary())
        return checkpoint_numerics(self.checkpoint_dir)

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def read_summary(self) -> dict[str, Any]:
        """The finished run's summary, or one line naming the file when it is damaged (it is
        written atomically, so no crash leaves it half written)."""
        path = self.summary_path
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RunDirError(
                f"{str(path)!r} is not valid JSON (line {err.lineno}, column {err.colno}): "
                f"{err.msg}; allowed: the JSON object a finished run writes"
            ) from None
        except UnicodeDecodeError as err:
            raise RunDirError(
                f"{str(path)!r} is not UTF-8 text (byte {err.start}); allowed: the JSON object "
                "a finished run writes"
            ) from None
        if not isinstance(summary, dict):
            raise RunDirError(
                f"{str(path)!r} holds {type(summary).__name__} JSON; allowed: the JSON object "
                "a finished run writes"
            )
        return summary


def finished_run(path: Path) -> RunDir:
    """``path`` as a finished run (its adapter and config written), or one line saying why not:
    what ``fedhello export`` and ``fedhello eval`` read."""
    run = RunDir(path)
    allowed = "allowed: a finished fedhello run directory"
    if not run.path.exists():
        raise RunDirError(f"run directory {str(path)!r} does not exist; {allowed}")
    if not run.path.is_dir():
        raise RunDirError(f"run directory {str(path)!r} is a file; {allowed}")
    if not run.config_path.is_file():  # resuming it would not help: say what it is
        raise RunDirError(f"{str(path)!r} is not a fedhello run (no config.toml); {allowed}")
    if not (run.adapter_dir / "adapter_config.json").is_file():
        if run.summary_path.is_file():  # finished: resuming it would do nothing
            raise RunDirError(
                f"run {str(path)!r} finished (it has summary.json) but its adapter was not "
                "kept (a published run folder keeps its summaries only); allowed: a finished "
                "run with its adapter/ folder (rerun its config.toml with `fedhello run` to make "
                "one)"
            )
        raise RunDirError(
            f"run {str(path)!r} has no adapter: it has not finished; allowed: a finished run "
            f"(continue this one with `fedhello run --resume {path}`)"
        )
    return run


def check_folder(path: Path, what: str) -> None:
    """Raise unless ``path`` is a folder or can be made one: neither it nor a folder above it
    may be a file (``mkdir`` would fail there with a traceback, after other work)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what} {str(path)!r} is a file; allowed: a folder")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise RunDirError(
                f"{what} {str(path)!r}: its parent {str(parent)!r} is a file; allowed: a folder"
            )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
