"""The encoded examples of a causal language model (``fedhello.tasks.causal_lm``): token ids
kept per example, padded per batch, with the loss's per-token labels (the answer only).

Its own module so that what training, evaluation and generation read of a causal LM's data
(``fedhello.data.kinds.ModelInputs``, plus ``prompt_ids`` and ``references`` for generation)
is apart from how the examples are read and rendered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

IGNORE = -100  # the label of a token the loss skips (transformers' ignore_index)


class LMInputs:
    """Token ids of every example (prompt then answer), kept per example and padded per batch
    to the batch's longest, on the right: the :class:`~fedhello.data.kinds.ModelInputs` of a
    causal language model.

    ``labels`` is what it is for every kind, one class id per example (a 1-D tensor): here the
    category the partition splits by (``data.label_column``, or the one class of an unlabelled
    dataset). The engines read it as classes (``fedhello.model.training.label_counts``, the
    class-means head, the partition). The labels the loss reads are the per-token ones in each
    ``batch()``: -100 on the prompt and the padding, the token id on the answer.

    For generation: ``prompt_ids(i)`` is example i's prompt, exactly the prefix of its
    training tokens (ending with the template's generation prompt), and ``references[i]`` its
    answer as the data gives it. ``truncated``: how many answers were cut at
    ``model.max_length``."""

    trim = True

    def __init__(
        self,
        ids: np.ndarray,
        offsets: np.ndarray,
        prompt_lengths: np.ndarray,
        labels: torch.Tensor,
        references: list[str],
        pad_id: int,
        truncated: int = 0,
    ) -> None:
        self._ids = ids  # every example's tokens, one after the other
        self._offsets = offsets  # example i is _ids[offsets[i]:offsets[i + 1]]
        self.lengths = np.diff(offsets)  # tokens per example (prompt + answer)
        self.prompt_lengths = prompt_lengths
        self.labels = labels
        self.references = references
        self.pad_id = pad_id
        self.truncated = truncated

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, i: int) -> list[int]:
        """Example ``i``'s tokens, prompt then answer."""
        return self._ids[self._offsets[i] : self._offsets[i + 1]].tolist()

    def prompt_ids(self, i: int) -> list[int]:
        """Example ``i``'s prompt tokens: what generation starts from."""
        start = self._offsets[i]
        return self._ids[start : start + self.prompt_lengths[i]].tolist()

    def length_order(self, idx: np.ndarray) -> np.ndarray:
        """Positions of ``idx`` sorted by length: evaluation batches carry little padding."""
        return np.argsort(self.lengths[np.asarray(idx, dtype=np.int64)], kind="stable")

    def batch(
        self, idx: Sequence[int] | np.ndarray, augment: tuple[int, ...] | None = None
    ) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and per-token ``labels`` of the examples at
        ``idx``, padded on the right to the longest of them (``augment`` is for images)."""
        import torch

        index = np.asarray(idx, dtype=np.int64)
        lengths = self.lengths[index]
        width = int(lengths.max()) if len(index) else 0
        ids = np.full((len(index), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(index), width), IGNORE, dtype=np.int64)
        mask = np.zeros((len(index), width), dtype=np.int64)
        for row, (i, n) in enumerate(zip(index, lengths, strict=True)):
            start, p = self._offsets[i], self.prompt_lengths[i]
            ids[row, :n] = self._ids[start : start + n]
            labels[row, p:n] = ids[row, p:n]
            mask[row, :n] = 1
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels),
        }
