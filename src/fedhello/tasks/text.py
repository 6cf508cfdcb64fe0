"""Text classification: one text per example, or a sentence pair.

- one text: ``data.text_column = "text"``, tokenised alone;
- a sentence pair (QQP, QNLI): ``data.text_column = ["question1", "question2"]``, kept as
  (first, second) tuples and tokenised as a pair (the tokenizer's own pair handling: ``[SEP]``,
  segment ids, truncation of the longer side).

The model is a sequence classifier (``AutoModelForSequenceClassification``). ``text`` is also
the fallback of ``model.task = "auto"``: any model no other kind claims.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedhello.core.config import DataConfig
from fedhello.data.columns import read_strings
from fedhello.tasks.base import Task

if TYPE_CHECKING:
    import torch

    from fedhello.data.kinds import ModelInputs


class TextTask(Task):
    """Sequence classification of a text or a sentence pair, tokenised once per run."""

    name = "text"
    head = "SequenceClassification"

    def input_columns(self, cfg: DataConfig) -> list[tuple[str, str]]:
        return [(c, "text_column") for c in cfg.text_columns]

    def read_inputs(self, tables: Mapping[str, Any], cfg: DataConfig) -> Sequence[Any]:
        """Strings, or (first, second) tuples for a pair."""
        inputs: list[Any] = []
        for table in tables.values():
            columns = [
                read_strings(table, c, "text", "text_column", cfg.name) for c in cfg.text_columns
            ]
            inputs.extend(columns[0] if len(columns) == 1 else list(zip(*columns, strict=True)))
        return inputs

    def encode(
        self,
        inputs: Sequence[Any],
        labels: torch.Tensor,
        processor: Any,
        max_length: int,
        augment: bool,
    ) -> ModelInputs:
        """Token ids of every example (texts are not augmented): one row each."""
        from fedhello.data.encoding import from_tokens, token_kwargs

        texts = list(inputs)
        kwargs = token_kwargs(max_length)
        if texts and isinstance(texts[0], tuple):  # a sentence pair
            tok = processor([a for a, _ in texts], [b for _, b in texts], **kwargs)
        else:
            tok = processor(texts, **kwargs)
        return from_tokens(tok, (len(texts), -1), labels)

    def token_shape(self, batch_size: int, max_length: int, num_labels: int) -> tuple[int, ...]:
        """The shape of a full-size batch of token ids (the probe's)."""
        return (batch_size, max_length)

    def synthetic_batch(
        self, model: Any, batch_size: int, max_length: int, num_labels: int
    ) -> dict[str, torch.Tensor]:
        """``max_length`` random tokens per sequence, no padding (a real batch is cut back to
        its longest example, so it never needs more); ids from 1000 up skip special tokens."""
        import torch

        gen = torch.Generator().manual_seed(0)
        labels = torch.randint(0, num_labels, (batch_size,), generator=gen)
        vocab = int(getattr(model.config, "vocab_size", 30000))
        shape = self.token_shape(batch_size, max_length, num_labels)
        ids = torch.randint(min(1000, vocab - 1), vocab, shape, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
