"""Model inputs computed once per run: token ids (text) or pixel tensors (images).

Tokenising every round would cost more than a weak client's training; here the whole dataset is
tokenised once, padded to ``max_length``, and each batch is cut back to its longest example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedhello.core.errors import DataError
from fedhello.data.loading import RawData

IMAGE_CHUNK = 256


class Encoded:
    """Model-ready tensors for every example, indexed by the example's position in RawData."""

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
        lengths = self.features["attention_mask"][torch.as_tensor(idx)].sum(dim=1).numpy()
        return np.argsort(lengths, kind="stable")

    def batch(self, idx: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        out = {k: v[index] for k, v in self.features.items()}
        if self.trim:  # drop the padding columns no example of this batch uses
            width = int(out["attention_mask"].sum(dim=1).max())
            out = {k: v[:, :width] for k, v in out.items()}
        out["labels"] = self.labels[index]
        return out


def encode(raw: RawData, processor: Any, max_length: int) -> Encoded:
    labels = torch.as_tensor(raw.labels, dtype=torch.long)
    if raw.kind == "text":
        bad = next((i for i, t in enumerate(raw.inputs) if not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(
                f"text example {bad} is {type(raw.inputs[bad]).__name__} {raw.inputs[bad]!r}, "
                "not a string: check data.text_column"
            )
        # Python lists -> numpy -> torch: 3x faster than return_tensors="pt" on 82k texts.
        tok = processor(raw.inputs, padding="max_length", truncation=True, max_length=max_length)
        return Encoded(
            {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in tok.items()}, labels
        )
    chunks = []
    for start in range(0, len(raw.inputs), IMAGE_CHUNK):
        images = [_as_image(x) for x in raw.inputs[start : start + IMAGE_CHUNK]]
        chunks.append(processor(images=images, return_tensors="pt")["pixel_values"])
    return Encoded({"pixel_values": torch.cat(chunks).float()}, labels)


def encode_positions(
    raw: RawData, positions: np.ndarray, processor: Any, max_length: int
) -> Encoded:
    """Only the examples at ``positions``, in that order: row i of the result is example
    ``positions[i]``, encoded exactly as ``encode`` would (padding to ``max_length`` makes an
    example's tensors independent of the others)."""
    part = RawData(
        [raw.inputs[i] for i in positions], raw.labels[positions], raw.label_names, raw.kind,
        {"train": np.arange(len(positions))},
    )  # fmt: skip
    return encode(part, processor, max_length)


def _as_image(x: Any) -> Any:
    from PIL import Image

    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, dict) and "bytes" in x:  # datasets' Image feature, undecoded
        import io

        return Image.open(io.BytesIO(x["bytes"])).convert("RGB")
    arr = np.asarray(x)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255 if arr.max() <= 1 else 1), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)
