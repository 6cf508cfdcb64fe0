"""``fedhello compare``: paired runs of several strategies over seeds and partitions.

Everything but the allocation is shared by construction: partitions, client sampling, batch
order and initialisation derive from (seed, purpose, round, client), never from the strategy,
so for a given seed every strategy sees the same shards and the same clients in each round.
A comparison folder holds one run directory per (partition, strategy, seed):

    <compare>/compare.json                 what was compared, with the base config
    <compare>/runs/<partition>/<strategy>/seed<k>/   ordinary run directories
    <compare>/runs/centralized/seed<k>/    the non-federated reference (same steps in total)
    <compare>/results.md, results.csv, plots/   written by fedhello.studies.report

A finished run (summary.json with the same config and numerics version) is reused, a crashed
one resumed. A cell of an older numerics version (``fedhello.core.numerics``; a run that
records none is version 1) is run again and replaced, with a warning saying why, so that a table
never mixes two arithmetics; a cell of a newer one (a newer fedhello's) is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedhello.core.allocation import strategy_class
from fedhello.core.config import (
    AllocationConfig,
    Config,
    build_config,
    build_saved_config,
    load_saved_config,
    outcome_differences,
)
from fedhello.core.config.federation import FEDOPT_SETTINGS
from fedhello.core.errors import RunDirError
from fedhello.core.heads import AUTO
from fedhello.core.numerics import NUMERICS_VERSION
from fedhello.engine.core import Observer, RunOptions
from fedhello.engine.embedded import run_embedded
from fedhello.engine.experiment import DataCache
from fedhello.engine.node import model_task
from fedhello.engine.preflight import check_here
from fedhello.model.accelerator import accelerator_for, differs_from_recorded
from fedhello.model.recipe import settled_by_task
from fedhello.store.runs import PRECISION_KEYS, RunDir
from fedhello.studies.request import ROWS, check_folder
from fedhello.studies.results import CENTRALIZED

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One run of a comparison."""

    partition: str
    strategy: str  # "name" or "name:shape"; CENTRALIZED for the reference
    seed: int

    def path(self, root: Path) -> Path:
        if self.strategy == CENTRALIZED:
            return root / "runs" / CENTRALIZED / f"seed{self.seed}"
        return root / "runs" / self.partition / self.strategy.replace(":", "-") / f"seed{self.seed}"


def cell_config(base: Config, cell: Cell) -> Config:
    """The base config with only what the cell varies changed."""
    data = base.to_dict()
    data["run"]["seed"] = cell.seed
    data["run"].pop("name", None)
    if cell.strategy == CENTRALIZED:
        # One client holding the whole pool, every layer, the federation's work per round:
        # m clients of local_steps each (6 x 8 = 48 steps), or under local epochs e the
        # examples the m sampled of K clients are expected to train, e m / K of the pool
        # (each client's ceil(e n_k / B) aside: less than one step per client and round)
        t, c = base.train, base.clients
        data["clients"] = {"num_clients": 1, "per_round": 1, "tiers": [1.0]}
        data["allocation"]["strategy"] = "full"
        data["data"]["partition"] = "iid"
        if t.local_epochs is None:
            data["train"]["local_steps"] = c.per_round * t.local_steps
        else:
            data["train"]["local_epochs"] = t.local_epochs * c.per_round / c.num_clients
        # plain local training, as centralised fine-tuning is: no server optimizer moving
        # one client's round deltas, no proximal pull towards the round's start
        for key in ("server_optimizer", "server_lr", "server_momentum", *FEDOPT_SETTINGS):
            data["federation"].pop(key, None)
        data["train"].pop("proximal_mu", None)
        # the reference is the ceiling without privacy: one "client" holding every example
        # has no client-level privacy to give, and it trains as a federation never could
        data.pop("privacy", None)
    else:
        name, _, shape = cell.strategy.partition(":")
        name, settings = ROWS.get(name, (name, {}))
        data["allocation"]["strategy"] = name
        data["allocation"].update(settings)
        if shape:
            data["allocation"]["shape"] = shape
        data["data"]["partition"] = cell.partition
    # The base config is a template for every strategy compared: each cell keeps the options
    # that apply to its own strategy.
    own = {
        *AllocationConfig.model_fields,
        *strategy_class(data["allocation"]["strategy"]).Options.model_fields,
    }
    data["allocation"] = {k: v for k, v in data["allocation"].items() if k in own}
    return build_config(data)


def plan_cells(
    strategies: Sequence[str], seeds: Sequence[int], partitions: Sequence[str]
) -> list[Cell]:
    cells = [Cell(p, s, seed) for p in partitions for seed in seeds for s in strategies]
    return cells + [Cell(CENTRALIZED, CENTRALIZED, seed) for seed in seeds]


def comparable(cfg: Config) -> Config:
    """``cfg`` as a comparison compares it with a saved one: ``train.head`` and ``train.loss``
    ``auto`` settled where the task alone settles them (``settled_by_task``)."""
    if AUTO not in (cfg.train.head, cfg.train.loss):
        return cfg
    return settled_by_task(cfg, model_task(cfg)[1])


def machine_differences(cfg: Config, recorded: Mapping[str, Any]) -> list[str]:
    """``what (recorded -> here)`` for the device type and torch thread count a run recorded
    and this process would compute it with (``run.threads = 0``: torch's default here)."""
    here = {
        "device": accelerator_for(cfg).device.type,
        "torch_threads": cfg.run.threads or torch.get_num_threads(),
    }
    return [
        f"{key} ({recorded[key]!r} -> {here[key]!r}"
        + (f", run.threads = {cfg.run.threads})" if key == "torch_threads" else ")")
        for key in here
        if key in recorded and recorded[key] != here[key]
    ]


def run_cell(
    cell: Cell, cfg: Config, root: Path, observer: Observer | None = None,
    cache: DataCache | None = None,
) -> str:  # fmt: skip
    """Run one cell unless it is finished; returns "reused", "resumed", "ran" or "rerun" (a
    cell of an older numerics version, ``fedhello.core.numerics``, computed again in place)."""
    run = RunDir(cell.path(root))
    with run.writing(wait=True):  # another comparison running it: wait, then reuse it
        return _run_cell(cfg, run, RunOptions(observer=observer or Observer(), cache=cache))


def _run_cell(cfg: Config, run: RunDir, options: RunOptions) -> str:
    if run.config_path.is_file():
        # precisions compare as resolved (``auto`` resolves per machine), the rest as written
        saved = comparable(load_saved_config(run.config_path))
        diff = outcome_differences(saved, comparable(cfg), PRECISION_KEYS)
        diff += differs_from_recorded(cfg, run.recorded_precision())
        recorded = run.recorded_numerics()
        if recorded is None or recorded == NUMERICS_VERSION:  # an older one is rerun anyway
            diff += machine_differences(cfg, run.recorded_machine())
        if diff:
            raise RunDirError(
                f"{run.path} holds a run with another config ({', '.join(diff)}): "
                "use a new comparison folder"
            )
        recorded = run.recorded_numerics()
        if recorded is not None and recorded > NUMERICS_VERSION:
            raise RunDirError(
                f"{run.path} was computed with numerics version {recorded}, newer than this "
                f"fedhello's {NUMERICS_VERSION}: update fedhello, or use a new comparison folder"
            )
        if recorded is not None and recorded != NUMERICS_VERSION:
            # same config, older arithmetic: its numbers must not sit in a table beside
            # today's, and resuming it would mix the two within one run. Its files are replaced
            # only once the new run has started (a setup error leaves them as they were).
            logger.warning(
                "%s was computed with numerics version %d, this fedhello computes version %d "
                "(fedhello.core.numerics): running it again, its files replaced",
                run.path, recorded, NUMERICS_VERSION,
            )  # fmt: skip
            options.overwrite = True
            run_embedded(cfg, run, options)
            return "rerun"
        if run.summary_path.is_file():
            return "reused"
        options.resume = True
        run_embedded(cfg, run, options)
        return "resumed"
    run_embedded(cfg, run, options)
    return "ran"


def run_compare(
    base: Config,
    root: Path,
    strategies: Sequence[str],
    seeds: Sequence[int],
    partitions: Sequence[str],
    on_cell: Callable[[Cell, int, int], Observer | None] | None = None,
    on_done: Callable[[Cell, str], None] | None = None,
    cache_dir: Path | None = None,
) -> list[Cell]:
    """Run every cell (reusing finished ones) and write ``compare.json``. A model path, data
    file or device missing here is refused before anything is written
    (``fedhello.engine.preflight``): a typo'd config leaves no half comparison behind."""
    if base.privacy.enabled and base.privacy.noise == "secret":
        logger.warning(
            "privacy.noise = 'secret': every cell draws its own key, so strategies of one seed "
            "see different sites and different noise, and the paired differences carry both; "
            "a paired study sets privacy.noise = 'seeded' (no guarantee against whoever knows "
            "the seed: a study's setting)"
        )
    cells = plan_cells(strategies, seeds, partitions)
    configs = {cell: cell_config(base, cell) for cell in cells}  # all errors before any work
    check_folder(root)
    check_here(configs[cells[0]])  # a missing model, data file or device: before any write
    _write_spec(base, root, strategies, seeds, partitions)
    cache = DataCache(cache_dir)  # every cell reads the same data: load and tokenise it once
    for i in range(len(cells)):
        _one_cell(cells, i, configs, root, cache, on_cell, on_done)
    return cells


def _one_cell(
    cells: Sequence[Cell], i: int, configs: Mapping[Cell, Config], root: Path, cache: DataCache,
    on_cell: Callable[[Cell, int, int], Observer | None] | None,
    on_done: Callable[[Cell, str], None] | None,
) -> None:  # fmt: skip
    cell = cells[i]
    observer = on_cell(cell, i, len(cells)) if on_cell else None
    outcome = run_cell(cell, configs[cell], root, observer, cache)
    logger.info("%s %s seed %d: %s", cell.partition, cell.strategy, cell.seed, outcome)
    if on_done:
        on_done(cell, outcome)


def _write_spec(
    base: Config, root: Path, strategies: Sequence[str], seeds: Sequence[int],
    partitions: Sequence[str],
) -> bytes:  # fmt: skip
    """``compare.json``: what was compared (grown by what this comparison adds); returns what
    it wrote."""
    root.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {
        "strategies": list(strategies),
        "seeds": list(seeds),
        "partitions": list(partitions),
        "base_config": base.to_dict(),
    }
    spec_path = root / "compare.json"
    if spec_path.is_file():
        old = json.loads(spec_path.read_text())
        saved = comparable(build_saved_config(old.get("base_config", {})))
        diff = outcome_differences(saved, comparable(base), PRECISION_KEYS)  # and each cell
        if diff:
            raise RunDirError(
                f"{root} holds a comparison of another base config ({', '.join(diff)}): "
                "use a new --out"
            )
        for key in ("strategies", "seeds", "partitions"):  # a compare may grow
            spec[key] = list(dict.fromkeys([*old.get(key, []), *spec[key]]))
    text = (json.dumps(spec, indent=2) + "\n").encode()
    spec_path.write_bytes(text)
    return text
