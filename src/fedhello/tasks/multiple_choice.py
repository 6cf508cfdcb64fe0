"""Multiple choice (Belebele): one score per answer choice; the right choice is the label.

An example is a (context, question, choices) tuple read from ``data.context_column``,
``data.question_column`` and ``data.choice_columns``. Each choice is tokenised as one pair
(context, question + choice), or (question, choice) without a context, so an example is a
(choices, tokens) block; transformers' multiple-choice head scores every pair and the softmax
over the choices picks one. The label is the right choice's number, counted from
``data.answer_base`` (Belebele counts from 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhello.core.config import Config, DataConfig
from fedhello.core.errors import ConfigError, DataError
from fedhello.data.columns import read_strings
from fedhello.tasks.text import TextTask

if TYPE_CHECKING:
    import torch

    from fedhello.data.kinds import ModelInputs


class MultipleChoiceTask(TextTask):
    """A text task whose examples are blocks of (passage, question + choice) pairs."""

    name = "multiple-choice"
    head = "MultipleChoice"
    class_rows = False  # one score per choice: train.head and train.loss "auto" are plain

    def check_config(self, cfg: Config) -> None:
        """At least two choices, something to read them with, no sentence pair, the plain
        local loss (a skew-aware loss needs classes) and no class-means head."""
        d = cfg.data
        if len(d.choice_columns) < 2:
            raise ConfigError(
                f"config: data.choice_columns = {d.choice_columns}: model.task = "
                "'multiple-choice' needs one column per answer choice, at least two"
            )
        if not (d.context_column or d.question_column):
            raise ConfigError(
                "config: data.context_column and data.question_column are both unset: a "
                "multiple-choice task reads each choice with a passage, a question or both; "
                "set at least one"
            )
        if not isinstance(d.text_column, str):
            raise ConfigError(
                f"config: data.text_column = {d.text_column} with model.task = "
                "'multiple-choice': its inputs are data.context_column, data.question_column "
                "and data.choice_columns; allowed: leave text_column as one column"
            )
        if cfg.train.loss not in ("cross-entropy", "auto"):
            raise ConfigError(
                f"config: train.loss = {cfg.train.loss!r} with model.task = 'multiple-choice': "
                "its labels are answer positions, not classes a client lacks; allowed: "
                "loss = 'cross-entropy' or 'auto'"
            )
        if cfg.train.loss == "auto" and cfg.train.calibration_tau != 1.0:
            raise ConfigError(
                f"config: train.calibration_tau = {cfg.train.calibration_tau} with train.loss "
                "= 'auto' and model.task = 'multiple-choice': auto is cross-entropy here, "
                "which has no tau; allowed: its default 1.0"
            )
        if cfg.train.head == "class-means":
            raise ConfigError(
                "config: train.head = 'class-means' with model.task = 'multiple-choice': its "
                "head scores each choice, it has no class rows to build from class means; "
                "allowed: head = 'auto', 'federated', 'frozen' or 'local'"
            )

    def input_columns(self, cfg: DataConfig) -> list[tuple[str, str]]:
        named = [(cfg.context_column, "context_column"), (cfg.question_column, "question_column")]
        return [(c, k) for c, k in named if c] + [(c, "choice_columns") for c in cfg.choice_columns]

    def read_inputs(self, tables: Mapping[str, Any], cfg: DataConfig) -> Sequence[Any]:
        """(context, question, choices) tuples; an unset context or question is ""."""
        inputs: list[Any] = []
        for table in tables.values():
            inputs.extend(_choice_rows(table, cfg))
        return inputs

    def label_ids(
        self, labels: list[Any], tables: Mapping[str, Any], cfg: DataConfig
    ) -> tuple[list[str], np.ndarray]:
        """The label is the number of the right choice (``data.answer_base`` is the first
        choice's number), as an int or a string holding one; the classes are the choices."""
        n = len(cfg.choice_columns)
        base = cfg.answer_base
        ids = np.empty(len(labels), dtype=np.int64)
        for row, value in enumerate(labels):
            try:
                number = int(str(value).strip())
            except ValueError:
                number = None
            if number is None or not base <= number < base + n:
                raise DataError(
                    f"data.label_column = {cfg.label_column!r}: row {row} has answer {value!r}; "
                    f"allowed: the number of a choice, {base}..{base + n - 1} "
                    f"(data.answer_base = {base}, {n} choice_columns)"
                )
            ids[row] = number - base
        return [str(base + i) for i in range(n)], ids

    def encode(
        self,
        inputs: Sequence[Any],
        labels: torch.Tensor,
        processor: Any,
        max_length: int,
        augment: bool,
    ) -> ModelInputs:
        """One pair per choice: (context, question + choice), or (question, choice)."""
        from fedhello.data.encoding import from_tokens, token_kwargs

        rows = list(inputs)
        choices = len(rows[0][2]) if rows else 0
        firsts = [context or question for context, question, options in rows for _ in options]
        seconds = [f"{question} {o}".strip() if context else o
                   for context, question, options in rows for o in options]  # fmt: skip
        tok = processor(firsts, seconds, **token_kwargs(max_length))
        return from_tokens(tok, (len(rows), choices, -1), labels)

    def token_shape(self, batch_size: int, max_length: int, num_labels: int) -> tuple[int, ...]:
        """One sequence per choice: the classes are the choices."""
        return (batch_size, num_labels, max_length)


def _choice_rows(table: Any, cfg: DataConfig) -> list[tuple[str, str, tuple[str, ...]]]:
    n = len(table)
    parts = {}
    for key in ("context_column", "question_column"):
        column = getattr(cfg, key)
        parts[key] = (
            read_strings(table, column, key.split("_")[0], key, cfg.name) if column else [""] * n
        )
    choices = [
        read_strings(table, c, "choice", "choice_columns", cfg.name) for c in cfg.choice_columns
    ]
    return [
        (context, question, tuple(c[row] for c in choices))
        for row, (context, question) in enumerate(
            zip(parts["context_column"], parts["question_column"], strict=True)
        )
    ]
