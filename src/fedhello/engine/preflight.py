"""What can be checked of a config on this machine before anything is written: the model and
data paths a run would read, and the device it would compute on.

A run finds a missing model folder, data file or GPU only while it builds its experiment; a
comparison has by then written its ``compare.json`` and the first cell's lock, and leaves a
half comparison behind. These checks load nothing and download nothing (a path is looked up,
a device asked for), so ``fedhello compare`` makes them before it writes, and
``fedhello validate`` reports the path problems as warnings (its config may be meant for
another machine).
"""

from __future__ import annotations

from pathlib import Path

from fedhello.core.config import Config
from fedhello.core.errors import DataError, UserError

__all__ = ["check_here", "missing_paths"]


def missing_paths(cfg: Config) -> list[UserError]:
    """Why ``model.name`` or ``data.name``, read as a run reads them, name a local path that
    is not here (``fedhello.model.source.resolve_model_source``: a registry model not
    installed, a folder without config.json; ``fedhello.data.loading``: a path or a file name
    of a known format), as the errors a run would raise; a hub name is not looked up."""
    from fedhello.data.loading import BUILTIN, names_a_file
    from fedhello.model.source import resolve_model_source

    found: list[UserError] = []
    try:
        resolve_model_source(cfg.model.name, allow_download=True)  # a hub name: returned as is
    except UserError as err:
        found.append(err)
    name = cfg.data.name
    if name not in BUILTIN and names_a_file(name) and not Path(name).expanduser().exists():
        found.append(DataError(f"data.name = {name!r}: file does not exist"))
    return found


def check_here(cfg: Config) -> None:
    """Raise what a run of ``cfg`` would raise first on this machine for a missing model, data
    file or device (``fedhello.model.accelerator.accelerator_for``)."""
    from fedhello.model.accelerator import accelerator_for

    accelerator_for(cfg)
    for problem in missing_paths(cfg):
        raise problem
