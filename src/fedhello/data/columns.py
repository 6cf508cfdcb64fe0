"""Reading a dataset's columns, with one clear error for a missing column or a bad value.

Which columns a task kind reads, and how a row becomes an input (one text, a sentence pair, a
multiple-choice tuple, an image), is the kind's own business (``fedhello.tasks``); these are the
helpers every kind reads with, so that every kind's errors name the config key, the column and
what is allowed in the same words.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fedhello.core.errors import DataError


def read_column(table: Any, column: str, role: str, key: str, name: str) -> list[Any]:
    """The values of ``column`` (``data.<key>``, the ``role`` column of dataset ``name``)."""
    check_column(table, column, role, key, name)
    return list(table[column])


def column_names(table: Any) -> list[str]:
    """The column names of a pandas DataFrame or a ``datasets.Dataset``."""
    return [str(c) for c in (getattr(table, "column_names", None) or table.columns)]


def check_column(table: Any, column: str, role: str, key: str, name: str) -> None:
    columns = column_names(table)
    if column not in columns:
        raise DataError(
            f"data.{key} = {column!r}: dataset {name!r} has no such {role} column; "
            f"its columns: {', '.join(map(str, columns))}"
        )


def check_columns(table: Any, columns: Iterable[tuple[str, str]], name: str) -> None:
    """One clear error for the first (column, config key) that ``table`` lacks; the role in
    the message is the key's first word (``context_column``: a context column)."""
    for column, key in columns:
        check_column(table, column, key.split("_")[0], key, name)


def read_strings(table: Any, column: str, role: str, key: str, name: str) -> list[str]:
    """``read_column`` of a column that must hold texts."""
    return strings(read_column(table, column, role, key, name), key, column)


def strings(values: list[Any], key: str, column: str) -> list[str]:
    """``values`` if every one is a string; else a DataError naming the first that is not."""
    bad = next((i for i, t in enumerate(values) if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(
            f"data.{key}: column {column!r} row {bad} is {type(values[bad]).__name__} "
            f"{values[bad]!r}, not a string; allowed: a column of texts"
        )
    return values
