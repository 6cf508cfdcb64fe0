"""Datasets: the shipped WordNet nouns, local CSV/TSV/JSONL/Parquet files, saved HF datasets
and hub names; a fixed train/validation/test split; tokenisation (or image preprocessing) once.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fedhello.core.config import DataConfig
from fedhello.core.errors import DataError
from fedhello.core.seeds import Purpose, generator

logger = logging.getLogger(__name__)

BUILTIN = {"wordnet-nouns": "wordnet_nouns.tsv.gz"}
FILE_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


@dataclass
class RawData:
    """Inputs (texts or images) with integer labels, and the split each example belongs to."""

    inputs: list[Any]
    labels: np.ndarray
    label_names: list[str]
    kind: str  # "text" | "image"
    splits: dict[str, np.ndarray]  # "train" | "validation" | "test" -> indices into inputs


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


def load_tables(name: str, allow_download: bool) -> dict[str, Any]:
    """Split name -> table with column access (pandas DataFrame or datasets.Dataset)."""
    if name in BUILTIN:
        with resources.files("fedhello.data").joinpath("builtin", BUILTIN[name]).open("rb") as raw:
            return {"all": _read_table_gz_tsv(raw)}
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
    if name.startswith((".", "/", "~")) or Path(name).suffix in FILE_FORMATS or name.count("/") > 1:
        raise DataError(f"data.name = {name!r}: file does not exist")
    if not allow_download:
        raise DataError(
            f"data.name = {name!r} is neither a built-in dataset ({', '.join(BUILTIN)}) nor a "
            "local file or folder, and hub downloads are off: use a local copy or "
            "--set model.allow_download=true"
        )
    import datasets

    try:
        return dict(datasets.load_dataset(name))
    except Exception as err:  # network, missing dataset, ...
        raise DataError(f"data.name = {name!r}: cannot load it from the hub: {err}") from None


def _read_table_gz_tsv(raw: Any) -> Any:
    import pandas as pd

    with gzip.open(raw, "rt", encoding="utf-8") as f:
        return pd.read_csv(f, sep="\t", quoting=3, keep_default_na=False)


def read_column(table: Any, column: str, role: str, key: str, name: str) -> list[Any]:
    columns = list(getattr(table, "column_names", None) or table.columns)
    if column not in columns:
        raise DataError(
            f"data.{key} = {column!r}: dataset {name!r} has no such {role} column; "
            f"its columns: {', '.join(map(str, columns))}"
        )
    return list(table[column])


def input_column(cfg: DataConfig, kind: str) -> tuple[str, str]:
    """(column name, its config key) of the model inputs: images or texts."""
    if kind == "image":
        return cfg.image_column, "image_column"
    return cfg.text_column, "text_column"


def load_raw(cfg: DataConfig, kind: str, allow_download: bool) -> RawData:
    """Read the dataset named by ``cfg`` (a DataConfig) and fix its splits."""
    split_seed = cfg.split_seed
    tables = load_tables(cfg.name, allow_download)
    in_col, in_key = input_column(cfg, kind)
    inputs: list[Any] = []
    labels: list[Any] = []
    offsets: dict[str, np.ndarray] = {}
    for split, table in tables.items():
        x = read_column(table, in_col, kind, in_key, cfg.name)
        y = read_column(table, cfg.label_column, "label", "label_column", cfg.name)
        offsets[split] = np.arange(len(inputs), len(inputs) + len(x))
        inputs.extend(x)
        labels.extend(y)
    if any(v is None for v in labels):
        raise DataError(f"data.label_column = {cfg.label_column!r}: has missing labels")
    names, label_ids = _encode_labels(labels, tables)
    splits = _fix_splits(offsets, len(inputs), cfg, split_seed)
    if cfg.max_train_examples is not None and cfg.max_train_examples < len(splits["train"]):
        keep = generator(split_seed, Purpose.SPLIT, 1).permutation(len(splits["train"]))
        splits["train"] = np.sort(splits["train"][keep[: cfg.max_train_examples]])
    logger.info(
        "data %s: %d classes, %s", cfg.name, len(names), {k: len(v) for k, v in splits.items()}
    )
    return RawData(inputs, label_ids, names, kind, splits)


def _encode_labels(labels: list[Any], tables: dict[str, Any]) -> tuple[list[str], np.ndarray]:
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
    offsets: dict[str, np.ndarray], n: int, cfg: DataConfig, seed: int
) -> dict[str, np.ndarray]:
    """Use the source's test split if it has one; otherwise carve test/validation by seed."""
    rng = generator(seed, Purpose.SPLIT, 0)
    if "test" in offsets:
        test = offsets["test"]
        pool = np.concatenate([v for k, v in offsets.items() if k != "test"])
        perm = rng.permutation(pool)
        n_val = round(cfg.validation_fraction * len(pool))
        return {"train": np.sort(perm[n_val:]), "validation": np.sort(perm[:n_val]), "test": test}
    perm = rng.permutation(n)
    n_test = round(cfg.test_fraction * n)
    n_val = round(cfg.validation_fraction * n)
    return {
        "test": np.sort(perm[:n_test]),
        "validation": np.sort(perm[n_test : n_test + n_val]),
        "train": np.sort(perm[n_test + n_val :]),
    }
