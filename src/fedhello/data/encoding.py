"""Model inputs: token ids computed once per run (text, sentence pairs, multiple choice), or
images made per batch (:class:`~fedhello.data.images.ImageData`).

Tokenising every round would cost more than a weak client's training; here the whole dataset is
tokenised once, padded to ``max_length``, and each batch is cut back to its longest example.
Images are the opposite case: their pixels are large, so they are decoded per batch instead.
What a kind tokenises (one text, a pair, one pair per choice) is its task's ``encode``
(``fedhello.tasks``); the tensors it makes are the :class:`Encoded` of this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedhello.data.images import ImageColumn
from fedhello.data.kinds import ModelInputs
from fedhello.data.loading import RawData

__all__ = ["Encoded", "ModelInputs", "encode", "encode_positions", "from_tokens", "token_kwargs"]


class Encoded:
    """Token tensors for every example, indexed by the example's position in RawData: shape
    (examples, tokens), or (examples, choices, tokens) for multiple choice."""

    def __init__(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels
        self.trim = "attention_mask" in features

    def __len__(self) -> int:
        return len(self.labels)

    def length_order(self, idx: np.ndarray) -> np.ndarray:
        """Positions of ``idx`` sorted by input length: evaluation batches carry little padding."""
        if not self.trim:
            return np.arange(len(idx))
        mask = self.features["attention_mask"][torch.as_tensor(idx)]
        lengths = mask.sum(dim=-1).reshape(len(idx), -1).max(dim=1).values.numpy()
        return np.argsort(lengths, kind="stable")

    def batch(
        self, idx: Sequence[int] | np.ndarray, augment: tuple[int, ...] | None = None
    ) -> dict[str, torch.Tensor]:
        """The examples at ``idx`` (``augment`` is for images; texts are not augmented)."""
        index = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        out = {k: v[index] for k, v in self.features.items()}
        if self.trim:  # drop the padding columns no example (or choice) of this batch uses
            width = int(out["attention_mask"].sum(dim=-1).max())
            out = {k: v[..., :width] for k, v in out.items()}
        out["labels"] = self.labels[index]
        return out


def token_kwargs(max_length: int) -> dict[str, Any]:
    """The tokenizer's arguments for every kind: padded to ``max_length`` (so an example's
    tensors do not depend on the others) and truncated there."""
    return {"padding": "max_length", "truncation": True, "max_length": max_length}


def from_tokens(tok: Mapping[str, Any], shape: tuple[int, ...], labels: torch.Tensor) -> Encoded:
    """A tokenizer's output (lists of ids per feature) as :class:`Encoded` tensors of
    ``shape`` (``-1``: the padded length)."""
    # Python lists -> numpy -> torch: 3x faster than return_tensors="pt" on 82k texts.
    features = {
        k: torch.from_numpy(np.asarray(v, dtype=np.int64).reshape(shape)) for k, v in tok.items()
    }
    return Encoded(features, labels)


def encode(raw: RawData, processor: Any, max_length: int, augment: bool = True) -> ModelInputs:
    """Model inputs of every example of ``raw``, made by the task that read it: tokens once
    (a text, a pair, one pair per choice), or images per batch, augmented in training batches
    when ``augment``."""
    labels = torch.as_tensor(raw.labels, dtype=torch.long)
    return raw.task.encode(raw.inputs, labels, processor, max_length, augment)


def encode_positions(
    raw: RawData, positions: np.ndarray, processor: Any, max_length: int, augment: bool = True
) -> ModelInputs:
    """Only the examples at ``positions``, in that order: row i of the result is example
    ``positions[i]``, encoded exactly as ``encode`` would (padding to ``max_length`` makes an
    example's tensors independent of the others)."""
    inputs = (
        raw.inputs.subset(positions)
        if isinstance(raw.inputs, ImageColumn)
        else [raw.inputs[i] for i in positions]
    )
    part = RawData(inputs, raw.labels[positions], raw.label_names, raw.task,
                   {"train": np.arange(len(positions))})  # fmt: skip
    return encode(part, processor, max_length, augment)
