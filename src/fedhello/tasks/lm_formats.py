"""The three formats a causal-LM example is read in (``fedhello.tasks.causal_lm``): chat
``messages``, prompt/response columns, and Alpaca's ``instruction`` / ``input`` / ``output``;
each row becomes one :class:`Exchange`, the turns before the answer and the answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from fedhello.core.config import DataConfig
from fedhello.core.errors import DataError
from fedhello.data.columns import check_column, column_names, read_strings

ALPACA = ("instruction", "input", "output")  # the Alpaca columns; "input" may be absent
MESSAGES = "messages"  # the chat column found by name when data.messages_column is unset


class Exchange(NamedTuple):
    """One example: the turns before the answer, as (role, content), and the answer."""

    prompt: tuple[tuple[str, str], ...]
    response: str


def input_format(table: Any, cfg: DataConfig) -> tuple[str, list[str]]:
    """("messages" | "columns" | "alpaca", the columns read) of ``table``; a DataError naming
    the first column it lacks and the key that names it."""
    if cfg.messages_column is not None:
        check_column(table, cfg.messages_column, "messages", "messages_column", cfg.name)
        return "messages", [cfg.messages_column]
    if cfg.prompt_column is not None and cfg.response_column is not None:
        check_column(table, cfg.prompt_column, "prompt", "prompt_column", cfg.name)
        check_column(table, cfg.response_column, "response", "response_column", cfg.name)
        return "columns", [cfg.prompt_column, cfg.response_column]
    columns = column_names(table)
    instruction, input_, output = ALPACA
    if instruction in columns or output in columns:
        for missing in (c for c in (instruction, output) if c not in columns):
            raise DataError(
                f"data.prompt_column unset: dataset {cfg.name!r} has no {missing!r} column for "
                f"the Alpaca format ({instruction}, optional {input_}, {output}); allowed: "
                "those columns, data.prompt_column and data.response_column, or "
                f"data.messages_column; its columns: {', '.join(columns)}"
            )
        return "alpaca", [c for c in ALPACA if c in columns]
    if MESSAGES in columns:
        return "messages", [MESSAGES]
    raise DataError(
        f"data.prompt_column and data.messages_column unset: dataset {cfg.name!r} has neither "
        f"the Alpaca columns ({instruction}, optional {input_}, {output}) nor a {MESSAGES!r} "
        "column; allowed: those, or set data.prompt_column and data.response_column, or "
        f"data.messages_column; its columns: {', '.join(columns)}"
    )


def column_rows(table: Any, form: str, columns: list[str], name: str) -> list[Exchange]:
    """Exchanges of the prompt/response columns, or of the Alpaca columns."""
    if form == "columns":
        prompts = read_strings(table, columns[0], "prompt", "prompt_column", name)
        answers = read_strings(table, columns[1], "response", "response_column", name)
    else:
        instruction, input_, output = ALPACA
        prompts = _alpaca_strings(table, instruction, name, optional=False)
        answers = _alpaca_strings(table, output, name, optional=False)
        if input_ in columns:
            extra = _alpaca_strings(table, input_, name, optional=True)
            prompts = [
                f"{p}\n\n{x}" if x.strip() else p for p, x in zip(prompts, extra, strict=True)
            ]
    return [Exchange((("user", p),), a) for p, a in zip(prompts, answers, strict=True)]


def _alpaca_strings(table: Any, column: str, name: str, optional: bool) -> list[str]:
    """The Alpaca column's texts; an ``optional`` one may hold empty cells (None, NaN)."""
    values = list(table[column])
    out = []
    for row, v in enumerate(values):
        if isinstance(v, str):
            out.append(v)
        elif optional and (v is None or (isinstance(v, float) and math.isnan(v))):
            out.append("")
        else:
            raise DataError(
                f"dataset {name!r}: Alpaca column {column!r} row {row} is {type(v).__name__} "
                f"{v!r}, not a string; allowed: texts" + (" or empty cells" if optional else "")
            )
    return out


def chat_rows(table: Any, column: str, split: str, name: str) -> tuple[list[Exchange], int]:
    """(an Exchange per conversation, how many had turns after the answer)."""
    rows: list[Exchange] = []
    dropped = 0
    for row, conversation in enumerate(table[column]):
        turns = _turns(conversation, column, split, row)
        last = next((i for i in range(len(turns) - 1, -1, -1) if turns[i][0] == "assistant"), None)
        if last is None:
            raise DataError(
                f"data.messages_column = {column!r}: split {split!r} row {row} has no "
                "assistant turn; allowed: conversations whose last assistant turn is the answer"
            )
        dropped += last < len(turns) - 1
        rows.append(Exchange(tuple(turns[:last]), turns[last][1]))
    return rows, dropped


def _turns(conversation: Any, column: str, split: str, row: int) -> list[tuple[str, str]]:
    """(role, content) of each turn; a DataError naming the row for anything else."""
    where = f"data.messages_column = {column!r}: split {split!r} row {row}"
    if isinstance(conversation, str | bytes | Mapping) or not hasattr(conversation, "__iter__"):
        raise DataError(
            f"{where} is {type(conversation).__name__}, not a list of turns; allowed: a list "
            'of {"role": ..., "content": ...}'
        )
    turns = []
    for turn in conversation:
        role = turn.get("role") if isinstance(turn, Mapping) else None
        content = turn.get("content") if isinstance(turn, Mapping) else None
        if not (isinstance(role, str) and isinstance(content, str)):
            raise DataError(
                f'{where} has a turn {turn!r}; allowed: {{"role": "<text>", "content": "<text>"}}'
            )
        turns.append((role, content))
    return turns
