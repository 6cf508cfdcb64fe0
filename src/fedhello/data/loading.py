"""Datasets: the shipped WordNet nouns (and the word definitions built from them), local
CSV/TSV/JSONL/Parquet files, saved HF datasets and hub names; a fixed train/validation/test
split; tokenisation (or image preprocessing) once.

Generic over task kinds: which columns hold the inputs, how they are read and how labels
become class ids is asked of the task (an :class:`~fedhello.data.kinds.InputKind`). A kind
whose examples need no class (a causal language model learning answers) says so with a class
attribute ``unlabelled_class`` (the one class's name): a dataset without its
``data.label_column`` is then read as that one class, which only an IID partition can split.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fedhello.core.config import DataConfig
from fedhello.core.errors import ConfigError, DataError
from fedhello.core.seeds import Purpose, generator
from fedhello.data import definitions
from fedhello.data.columns import column_names, read_column
from fedhello.data.kinds import InputKind

logger = logging.getLogger(__name__)

# Built-in name -> the shipped file it is read from (``builtin/``).
BUILTIN = {"wordnet-nouns": "wordnet_nouns.tsv.gz", "wordnet-definitions": "wordnet_nouns.tsv.gz"}
FILE_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


@dataclass
class RawData:
    """Inputs (texts or images) with integer labels, the task kind that read them (and will
    encode them), and the split each example belongs to."""

    inputs: Sequence[Any]  # texts, text pairs, choice tuples, or an ImageColumn (lazy)
    labels: np.ndarray
    label_names: list[str]
    task: InputKind  # a fedhello.tasks.Task
    splits: dict[str, np.ndarray]  # "train" | "validation" | "test" -> indices into inputs
    notes: dict[str, str] = field(default_factory=dict)  # e.g. a split not used, and why


def _read_table(path: Path) -> Any:
    import pandas as pd

    suffixes = [s for s in path.suffixes if s != ".gz"]
    fmt = FILE_FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise DataError(
            f"data.name = {str(path)!r}: unknown file type; allowed: {', '.join(FILE_FORMATS)} "
            "(optionally .gz), or a folder saved with datasets' save_to_disk"
        )
    try:
        if fmt in ("csv", "tsv"):
            return pd.read_csv(
                path, sep="\t" if fmt == "tsv" else ",", quoting=3 if fmt == "tsv" else 0
            )
        if fmt == "json":
            return pd.read_json(
                path, lines=path.suffix != ".json" or path.name.endswith(".jsonl.gz")
            )
        return pd.read_parquet(path)
    except Exception as err:  # pandas raises many types for unreadable files
        raise DataError(f"data.name = {str(path)!r}: cannot read it as {fmt}: {err}") from None


def load_tables(
    name: str, allow_download: bool, subset: str | None = None, cfg: DataConfig | None = None
) -> dict[str, Any]:
    """Split name -> table with column access (pandas DataFrame or datasets.Dataset).

    ``subset`` names a hub dataset's configuration; a local copy is one subset already.
    ``cfg``: the data settings a built-in dataset that fixes its own test split draws it with
    (``wordnet-definitions``: ``split_seed`` and ``test_fraction``; default: the defaults)."""
    if name in BUILTIN:
        with resources.files("fedhello.data").joinpath("builtin", BUILTIN[name]).open("rb") as raw:
            table = _read_table_gz_tsv(raw)
        if name == definitions.NAME:
            settings = cfg or DataConfig()
            return definitions.wordnet_definitions(
                table, settings.split_seed, settings.test_fraction
            )
        return {"all": table}
    path = Path(name).expanduser()
    if path.is_file():
        return {"all": _read_table(path)}
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise DataError(
                f"data.name = {name!r}: folder is not a dataset saved with save_to_disk ({err})"
            ) from None
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"all": loaded}
    if names_a_file(name):
        raise DataError(f"data.name = {name!r}: file does not exist")
    if not allow_download:
        raise DataError(
            f"data.name = {name!r} is neither a built-in dataset ({', '.join(BUILTIN)}) nor a "
            "local file or folder, and hub downloads are off: use a local copy or "
            "--set model.allow_download=true"
        )
    import datasets

    try:
        return dict(datasets.load_dataset(name, subset))
    except Exception as err:  # network, missing dataset, ...
        raise DataError(f"data.name = {name!r}: cannot load it from the hub: {err}") from None


def _read_table_gz_tsv(raw: Any) -> Any:
    import pandas as pd

    with gzip.open(raw, "rt", encoding="utf-8") as f:
        return pd.read_csv(f, sep="\t", quoting=3, keep_default_na=False)


def load_raw(cfg: DataConfig, task: InputKind, allow_download: bool) -> RawData:
    """Read the dataset named by ``cfg`` (a DataConfig) as ``task`` reads it (its inputs and
    labels) and fix its splits. A split whose labels are hidden (all missing or negative, as
    in GLUE's test) is dropped, and the run says so (``RawData.notes``)."""
    split_seed = cfg.split_seed
    tables = load_tables(cfg.name, allow_download, cfg.subset, cfg)
    notes: dict[str, str] = {}
    split_labels: dict[str, list[Any]] = {}
    if all(len(table) == 0 for table in tables.values()):  # a header alone, say
        raise DataError(f"data.name = {cfg.name!r}: no rows; allowed: a table with examples")
    for table in tables.values():
        task.check_inputs(table, cfg)
    one_class = _one_class(tables, cfg, task)
    for split, table in tables.items():
        if one_class is not None:
            y: list[Any] = [one_class] * len(table)
        else:
            y = read_column(table, cfg.label_column, "label", "label_column", cfg.name)
        why = _hidden(y, split, cfg)
        if why:
            notes[f"{split}_split"] = f"not used: its labels are hidden ({why}), as in GLUE's test"
        else:
            split_labels[split] = y
    if not split_labels:
        raise DataError(
            f"data.name = {cfg.name!r}: every split's labels in column "
            f"{cfg.label_column!r} are hidden (missing or negative); nothing to train on"
        )
    inputs = task.read_inputs({s: tables[s] for s in split_labels}, cfg)
    labels: list[Any] = []
    offsets: dict[str, np.ndarray] = {}
    for split, y in split_labels.items():
        offsets[split] = np.arange(len(labels), len(labels) + len(y))
        labels.extend(y)
    names, label_ids = task.label_ids(labels, tables, cfg)
    splits, split_notes = _fix_splits(offsets, len(labels), cfg, split_seed, hidden=bool(notes))
    notes.update(split_notes)
    if cfg.max_train_examples is not None and cfg.max_train_examples < len(splits["train"]):
        keep = generator(split_seed, Purpose.SPLIT, 1).permutation(len(splits["train"]))
        splits["train"] = np.sort(splits["train"][keep[: cfg.max_train_examples]])
    logger.info(
        "data %s: %d classes, %s", cfg.name, len(names), {k: len(v) for k, v in splits.items()}
    )
    for note in notes.values():
        logger.info("data %s: %s", cfg.name, note)
    return RawData(inputs, label_ids, names, task, splits, notes)


def _one_class(tables: Mapping[str, Any], cfg: DataConfig, task: InputKind) -> str | None:
    """The one class every example gets when ``task`` needs no classes (its
    ``unlabelled_class``) and no table has ``data.label_column``; None otherwise (the labels
    are read, and a table without the column is an error, as for every classifier). One class
    cannot be skewed across clients: any partition but IID is refused in one line."""
    name = getattr(task, "unlabelled_class", None)
    if name is None or any(cfg.label_column in column_names(t) for t in tables.values()):
        return None
    if cfg.partition != "iid":
        columns = column_names(next(iter(tables.values())))
        raise ConfigError(
            f"data.partition = {cfg.partition!r}: dataset {cfg.name!r} has no "
            f"data.label_column = {cfg.label_column!r} to split its examples by class; "
            "allowed: partition = 'iid', or label_column naming a category column (its "
            f"columns: {', '.join(columns)})"
        )
    logger.info(
        "data %s: no column %r (data.label_column): every example is class %r, split IID",
        cfg.name, cfg.label_column, name,
    )  # fmt: skip
    return str(name)


def _hidden(labels: list[Any], split: str, cfg: DataConfig) -> str | None:
    """Why a split's labels are hidden ("all missing", "all -1"), None if they are usable;
    a split with only *some* missing or negative labels is an error (not a hidden split)."""
    absent = [v is None or (isinstance(v, float) and np.isnan(v)) for v in labels]
    missing = sum(absent)  # None, or NaN where pandas read an empty cell
    values = np.asarray([v for v, gone in zip(labels, absent, strict=True) if not gone])
    negative = (
        int((values < 0).sum()) if values.size and np.issubdtype(values.dtype, np.number) else 0
    )
    if labels and missing + negative == len(labels):
        shown = sorted({str(v) for v in labels})[:3]
        return "all missing" if missing == len(labels) else f"all {'/'.join(shown)}"
    if missing or negative:
        what = f"{missing} missing" if missing else f"{negative} negative"
        raise DataError(
            f"data.label_column = {cfg.label_column!r}: split {split!r} has {what} labels of "
            f"{len(labels)}; allowed: every label present and non-negative, or a split whose "
            "labels are all hidden (it is then not used)"
        )
    return None


def encode_labels(labels: list[Any], tables: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    """Class labels as ids: a ``ClassLabel`` feature's names where the tables have one, ids
    0..k-1 kept as they are, anything else numbered in the sorted order of its text."""
    first = next(iter(tables.values()))
    features = getattr(first, "features", None) or {}
    values = np.asarray(labels)
    if np.issubdtype(values.dtype, np.integer):
        feature = next((f for f in features.values() if hasattr(f, "names")), None)
        uniq = np.unique(values)
        if feature is not None and uniq.min() >= 0 and uniq.max() < len(feature.names):
            return list(feature.names), values.astype(np.int64)
        if uniq.min() == 0 and uniq.max() == len(uniq) - 1:
            return [str(u) for u in uniq], values.astype(np.int64)
    names = sorted({str(v) for v in labels})
    index = {n: i for i, n in enumerate(names)}
    return names, np.array([index[str(v)] for v in labels], dtype=np.int64)


def _fix_splits(
    offsets: dict[str, np.ndarray], n: int, cfg: DataConfig, seed: int, hidden: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The source's test split if it has one beside others (validation carved from the rest);
    if its test labels were hidden, its validation split becomes the test split; otherwise
    test and validation are carved from everything by seed. Returns the splits and notes."""
    rng = generator(seed, Purpose.SPLIT, 0)
    if "test" in offsets and len(offsets) > 1:
        return _carve_validation(offsets, "test", cfg, rng), {}
    if hidden and "validation" in offsets and len(offsets) > 1:
        note = "test split: the source's validation split (its test labels are hidden)"
        return _carve_validation(offsets, "validation", cfg, rng), {"test_source": note}
    perm = rng.permutation(n)
    n_test = round(cfg.test_fraction * n)
    n_val = round(cfg.validation_fraction * n)
    splits = {
        "test": np.sort(perm[:n_test]),
        "validation": np.sort(perm[n_test : n_test + n_val]),
        "train": np.sort(perm[n_test + n_val :]),
    }
    carved: dict[str, str] = {}
    if len(offsets) == 1 and next(iter(offsets)) != "all":
        carved["test_source"] = (
            f"the source has one split ({next(iter(offsets))!r}): test and validation are "
            f"carved from it ({cfg.test_fraction:g} and {cfg.validation_fraction:g})"
        )
    return splits, carved


def _carve_validation(
    offsets: dict[str, np.ndarray], test: str, cfg: DataConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    pool = np.concatenate([v for k, v in offsets.items() if k != test])
    perm = rng.permutation(pool)
    n_val = round(cfg.validation_fraction * len(pool))
    return {"train": np.sort(perm[n_val:]), "validation": np.sort(perm[:n_val]),
            "test": offsets[test]}  # fmt: skip


def names_a_file(name: str) -> bool:
    """Whether ``data.name`` is written as a local path or file name (relative, absolute or
    home, more than one slash, or a known file format's suffix), not a built-in or hub name."""
    return (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix in FILE_FORMATS
    )
