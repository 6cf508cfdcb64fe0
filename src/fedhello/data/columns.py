"""The model inputs of each task kind, read from a dataset's columns.

- text: one column of strings (``data.text_column``);
- sentence pairs: two columns (``data.text_column = ["question1", "question2"]``), kept as
  (first, second) tuples and tokenised as a pair (the tokenizer's own pair handling);
- multiple choice: (context, question, choices) tuples from ``data.context_column``,
  ``data.question_column`` and ``data.choice_columns``;
- images: an :class:`~fedhello.data.images.ImageColumn`, a lazy view of the image column:
  nothing is decoded here, so memory does not grow with the number of images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedhello.core.config import DataConfig
from fedhello.core.errors import DataError
from fedhello.data.images import ImageColumn, image_part


def read_column(table: Any, column: str, role: str, key: str, name: str) -> list[Any]:
    check_column(table, column, role, key, name)
    return list(table[column])


def check_column(table: Any, column: str, role: str, key: str, name: str) -> None:
    columns = list(getattr(table, "column_names", None) or table.columns)
    if column not in columns:
        raise DataError(
            f"data.{key} = {column!r}: dataset {name!r} has no such {role} column; "
            f"its columns: {', '.join(map(str, columns))}"
        )


def read_inputs(tables: Mapping[str, Any], cfg: DataConfig, kind: str) -> Sequence[Any]:
    """The inputs of every table, concatenated in the tables' order (as the labels are)."""
    if kind == "image":
        return ImageColumn(
            [image_part(t, _checked(t, cfg.image_column, "image", cfg)) for t in tables.values()]
        )
    inputs: list[Any] = []
    for table in tables.values():
        inputs.extend(_text_rows(table, cfg, kind))
    return inputs


def input_columns(cfg: DataConfig, kind: str) -> list[tuple[str, str]]:
    """(column, config key) of every input column a ``kind`` task reads."""
    if kind == "image":
        return [(cfg.image_column, "image_column")]
    if kind == "multiple-choice":
        named = [(cfg.context_column, "context_column"), (cfg.question_column, "question_column")]
        return [(c, k) for c, k in named if c] + [(c, "choice_columns") for c in cfg.choice_columns]
    return [(c, "text_column") for c in cfg.text_columns]


def check_inputs(table: Any, cfg: DataConfig, kind: str) -> None:
    """One clear error for the first input column ``table`` lacks."""
    for column, key in input_columns(cfg, kind):
        check_column(table, column, key.split("_")[0], key, cfg.name)


def _checked(table: Any, column: str, key: str, cfg: DataConfig) -> str:
    check_column(table, column, key, f"{key}_column", cfg.name)
    return column


def _text_rows(table: Any, cfg: DataConfig, kind: str) -> list[Any]:
    if kind == "multiple-choice":
        return _choice_rows(table, cfg)
    columns = [
        _strings(read_column(table, c, "text", "text_column", cfg.name), "text_column", c)
        for c in cfg.text_columns
    ]
    return columns[0] if len(columns) == 1 else list(zip(*columns, strict=True))


def _choice_rows(table: Any, cfg: DataConfig) -> list[tuple[str, str, tuple[str, ...]]]:
    n = len(table)
    parts = {}
    for key in ("context_column", "question_column"):
        column = getattr(cfg, key)
        parts[key] = (
            _strings(read_column(table, column, key.split("_")[0], key, cfg.name), key, column)
            if column
            else [""] * n
        )
    choices = [
        _strings(read_column(table, c, "choice", "choice_columns", cfg.name), "choice_columns", c)
        for c in cfg.choice_columns
    ]
    return [
        (context, question, tuple(c[row] for c in choices))
        for row, (context, question) in enumerate(
            zip(parts["context_column"], parts["question_column"], strict=True)
        )
    ]


def _strings(values: list[Any], key: str, column: str) -> list[str]:
    bad = next((i for i, t in enumerate(values) if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(
            f"data.{key}: column {column!r} row {bad} is {type(values[bad]).__name__} "
            f"{values[bad]!r}, not a string; allowed: a column of texts"
        )
    return values
