"""The Python front door's functions: run a federation, plan one, compare strategies.

``import fedhello`` exposes these lazily (``fedhello.run``, ``fedhello.plan``,
``fedhello.compare``); the ``fedhello`` command calls them too. They change no process-wide
state behind the caller's back: no environment variables, no logging handlers, and the torch
thread count of ``run.threads`` only for the duration of the call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedhello.core.config import Config, load_saved_config
from fedhello.core.config import load_config as read_config
from fedhello.core.errors import RunDirError, UserError
from fedhello.store.runs import RunDir
from fedhello.tasks import check_config

ENGINES = ("embedded", "flower-sim", "flower")
ConfigLike = Config | str | Path | None


def _config(cfg: ConfigLike) -> Config:
    """``cfg`` (read if a path), with the checks of its task kind run: the core's config knows
    no kinds, so a Config built elsewhere is checked here too."""
    return check_config(cfg if isinstance(cfg, Config) else read_config(cfg))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A TOML config (or the defaults) with ``--set`` overrides, validated for use: every
    section (``fedhello.core.config.load_config``) and the task kind's own checks
    (``fedhello.tasks.check_config``). ``fedhello.load_config`` is this function."""
    return check_config(read_config(path, overrides))


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """``threads`` torch threads inside the block (0: leave torch's setting), restored after."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cache_folder(cache_dir: str | Path | None) -> Path | None:
    """``cache_dir`` as a folder (made when first written), refused in one line where a file
    already stands."""
    if cache_dir is None:
        return None
    if not str(cache_dir).strip():
        raise UserError("cache_dir '' names no folder; allowed: a folder path")
    path = Path(cache_dir)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(
                f"cache_dir {str(cache_dir)!r} is a file; allowed: a folder (or none yet)"
            )
    except OSError as e:
        raise UserError(f"cache_dir {str(cache_dir)!r} cannot be read ({e.strerror}); "
                        "allowed: a folder this user may read and write") from e  # fmt: skip
    return path


def run_dir_for(cfg: Config, out: str | Path | None) -> RunDir:
    """``out``, or ``run.out_dir/<run name>``."""
    return RunDir(Path(out) if out is not None else Path(cfg.run.out_dir) / cfg.run_name())


def run(
    cfg: ConfigLike = None,
    out: str | Path | None = None,
    *,
    engine: str = "embedded",
    resume: str | Path | None = None,
    overwrite: bool = False,
    observer: Any = None,
    superlink: str | None = None,
    root_certificates: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run one federation and return its summary (also written to ``<out>/summary.json``).

    ``cfg``: a :class:`Config`, a TOML path, or None for the defaults. ``out``: the run
    directory (default ``run.out_dir/<run name>``). ``engine``: ``embedded`` (this process),
    ``flower-sim`` (Flower's simulation) or ``flower`` (a SuperLink at ``superlink``, TLS with
    ``root_certificates``). ``resume``: a run directory to continue from its last complete
    round, with its own config (give no ``cfg`` or ``out`` then). ``observer``: progress hooks
    (a :class:`fedhello.engine.core.Observer`). ``cache_dir``: a folder that keeps FedNCM's
    round 0 (``train.head = "class-means"``) for any later run with the same fingerprint
    (``fedhello.engine.round_zero``; embedded engine).
    """
    from fedhello.engine.core import Observer, RunOptions
    from fedhello.engine.experiment import DataCache

    if engine not in ENGINES:
        raise UserError(f"engine = {engine!r}; allowed: {', '.join(ENGINES)}")
    if cache_dir is not None and engine != "embedded":
        raise UserError(
            f"cache_dir with engine {engine!r}: Flower's sites compute round 0 themselves; "
            "allowed: engine 'embedded'"
        )
    if resume is not None:
        if cfg is not None or out is not None or overwrite:
            raise UserError(
                "resume continues that run with its own config.toml: give no config, out or "
                "overwrite with it"
            )
        run_dir = RunDir(resume)
        if not run_dir.path.exists():
            raise RunDirError(
                f"resume {str(resume)!r} does not exist; allowed: a fedhello run folder"
            )
        if not run_dir.path.is_dir():
            raise RunDirError(f"resume {str(resume)!r} is a file; allowed: a fedhello run folder")
        if not run_dir.config_path.is_file():
            raise RunDirError(f"resume {str(resume)!r}: no config.toml there, not a fedhello run")
        config = load_saved_config(run_dir.config_path)
    else:
        config = _config(cfg)
        run_dir = run_dir_for(config, out)
    folder = cache_folder(cache_dir)
    cache = DataCache(folder) if folder is not None else None
    options = RunOptions(observer or Observer(), overwrite, resume is not None, cache)
    if engine == "flower":  # the deployed ServerApp writes the run and holds its lock
        from fedhello.engine.flower.runner import run_flower_deployment

        if not superlink:
            raise UserError("engine 'flower' needs superlink='HOST:PORT' (the Control API)")
        with run_dir.writing():  # refused now, in one line, if another process writes it
            if resume is None:
                run_dir.check_free(overwrite)
        certs = None if root_certificates is None else str(root_certificates)
        with torch_threads(config.run.threads):
            return run_flower_deployment(config, run_dir, superlink, certs, options)
    with run_dir.writing(), torch_threads(config.run.threads):
        if resume is None:
            run_dir.check_free(overwrite)  # before any long work
        if engine == "flower-sim":
            from fedhello.engine.flower.runner import run_flower_sim

            return run_flower_sim(config, run_dir, options)
        from fedhello.engine.embedded import run_embedded

        return run_embedded(config, run_dir, options)


def plan(cfg: ConfigLike = None, rounds: int | None = None) -> dict[str, Any]:
    """Every round's allocation as plain data, without training (``fedhello plan --json``)."""
    from fedhello.core.errors import ConfigError
    from fedhello.planner import make_plan

    if rounds is not None and rounds < 1:
        raise ConfigError(f"rounds = {rounds}: must be at least 1")
    return make_plan(_config(cfg), rounds)


def calibrate(cfg: ConfigLike = None, steps: int = 5, remeasure: bool = False) -> dict[str, Any]:
    """The cost profile of ``cfg``'s model, batch, device and precision: the stored one, or
    measured now and stored (``fedhello calibrate``); with what each limit affords. ``steps``:
    timed steps per entry (a profile of fewer than 5 is used, not stored)."""
    from fedhello.calibration import calibrate as measure

    config = _config(cfg)
    with torch_threads(config.run.threads):
        return measure(config, steps, remeasure)


def compare(
    cfg: ConfigLike = None,
    strategies: str | Sequence[str] = "all",
    seeds: str | Sequence[int] = (0, 1, 2),
    partitions: str | Sequence[str] | None = None,
    out: str | Path | None = None,
    *,
    baseline: str | None = None,
    on_cell: Callable[[Any, int, int], Any] | None = None,
    on_done: Callable[[Any, str], None] | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Paired runs of ``strategies`` over ``seeds`` and ``partitions`` (default: the config's),
    reusing finished runs; writes the report into the comparison folder ``out`` and returns
    it: ``table``, ``paired`` (differences against ``baseline``), ``plots`` and ``out``.

    Strategies are names, ``name:shape`` or "all"; lists may be given as comma-separated text.
    ``cache_dir``: a folder that keeps FedNCM's round 0 for later processes (see ``run``); a
    comparison shares it between its strategies of one seed in any case.
    """
    from fedhello.studies.compare import run_compare
    from fedhello.studies.report import write_report
    from fedhello.studies.request import (
        check_baseline,
        parse_ints,
        parse_partitions,
        parse_strategies,
    )

    config = _config(cfg)
    names = parse_strategies(strategies if isinstance(strategies, str) else ",".join(strategies))
    seed_list = parse_ints(seeds if isinstance(seeds, str) else ",".join(map(str, seeds)), "seeds")
    wanted = partitions if partitions is not None else config.data.partition
    parts = parse_partitions(wanted if isinstance(wanted, str) else ",".join(wanted))
    root = (
        Path(out)
        if out is not None
        else Path(config.run.out_dir) / (f"compare-{config.run.name or 'default'}")
    )
    check_baseline(baseline, names, root)
    baseline = None if baseline is None else baseline.replace(":", "-")  # its runs' folder name
    with torch_threads(config.run.threads):
        run_compare(config, root, names, seed_list, parts, on_cell=on_cell, on_done=on_done,
                    cache_dir=cache_folder(cache_dir))  # fmt: skip
    return write_report(root, baseline=baseline) | {"out": str(root)}
