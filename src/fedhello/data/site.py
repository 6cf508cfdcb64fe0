"""A site's own training data: a file on the node that never leaves it.

In a deployment each SuperNode may name a local file (``data="/srv/site.csv"`` in its node
config) instead of training its partition of the configured dataset, and needs nothing else
on the site but the model (``fedhello.engine.node.build_node_model``). The federation still
defines the task: the site file is read with the configured ``data.text_column`` /
``data.label_column`` (or ``image_column``), and its labels must be classes of the federation's
dataset (the classifier head is shared). A ``data.validation_fraction`` of the file is held
out: the final global model is evaluated there, on the site, and only the scores leave it.
The server keeps its own validation and test splits for everything else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedhello.core.config import DataConfig
from fedhello.core.errors import DataError
from fedhello.core.seeds import Purpose, generator
from fedhello.data.columns import column_names, read_column
from fedhello.data.kinds import InputKind
from fedhello.data.loading import FILE_FORMATS, RawData, load_tables

logger = logging.getLogger(__name__)

SHOWN_CLASSES = 8  # how many allowed class names an error message lists


def site_label_ids(labels: list[Any], label_names: list[str], path: str) -> np.ndarray:
    """Map a site's labels onto the federation's classes: by name, else as a class index.

    Raises a DataError naming the first label that is neither, and the allowed classes."""
    index = {name: i for i, name in enumerate(label_names)}
    ids = np.empty(len(labels), dtype=np.int64)
    for row, value in enumerate(labels):
        key = str(value)
        if key in index:
            ids[row] = index[key]
        elif isinstance(value, (int, np.integer)) and 0 <= int(value) < len(label_names):
            ids[row] = int(value)
        else:
            shown = ", ".join(label_names[:SHOWN_CLASSES])
            more = f", ... ({len(label_names)} in all)" if len(label_names) > SHOWN_CLASSES else ""
            raise DataError(
                f"site data {path!r}: row {row} has label {value!r}, not a class of the "
                f"federation; allowed: {shown}{more} (or a class index 0..{len(label_names) - 1})"
            )
    return ids


def site_splits(n: int, validation_fraction: float, split_seed: int) -> dict[str, np.ndarray]:
    """Training and held-out validation rows of a site's ``n`` examples (at least one to
    train on); the same for the same file size and seed."""
    n_val = min(round(validation_fraction * n), n - 1)
    perm = generator(split_seed, Purpose.SITE_SPLIT, n).permutation(n)
    return {"train": np.sort(perm[n_val:]), "validation": np.sort(perm[:n_val])}


def load_site_raw(
    path: str, data_cfg: DataConfig, task: InputKind, label_names: list[str]
) -> RawData:
    """Read a site's file (or saved ``datasets`` folder) as ``task`` reads its inputs, split
    into train and validation."""
    local = Path(path).expanduser()
    if not local.exists():
        raise DataError(
            f"site data {path!r}: no such file or folder; allowed: a local "
            f"{'/'.join(f.lstrip('.') for f in FILE_FORMATS)} file or a saved datasets folder"
        )
    tables = load_tables(str(local), allow_download=False)
    labels: list[Any] = []
    unlabelled = getattr(task, "unlabelled_class", None)
    if unlabelled is not None and not any(
        data_cfg.label_column in column_names(t) for t in tables.values()
    ):
        # a kind that needs no classes (a causal LM) on a file without the category column:
        # every row is the federation's first class (what only label counts would read)
        labels = [label_names[0]] * sum(len(t) for t in tables.values())
        logger.info("site data %s: no column %r: every row is class %r",
                    path, data_cfg.label_column, label_names[0])  # fmt: skip
    for table in tables.values() if not labels else ():
        labels.extend(read_column(table, data_cfg.label_column, "label", "label_column", path))
    inputs = task.read_inputs(tables, data_cfg)
    if not labels:
        raise DataError(f"site data {path!r}: has no examples; allowed: at least one row")
    if any(v is None for v in labels):
        raise DataError(f"site data {path!r}: column {data_cfg.label_column!r} has missing labels")
    ids = site_label_ids(labels, label_names, path)
    splits = site_splits(len(ids), data_cfg.validation_fraction, data_cfg.split_seed)
    logger.info(
        "site data %s: %d examples (%d held out), %d of %d classes",
        path, len(ids), len(splits["validation"]), len(np.unique(ids)), len(label_names),
    )  # fmt: skip
    return RawData(inputs, ids, list(label_names), task, splits)
