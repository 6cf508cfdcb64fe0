"""Images decoded and transformed per batch, never held as a dataset-sized pixel tensor.

Encoding every image once (the first design) cost about 1.3 MB of RAM per image at 224 px:
CIFAR-100's 60,000 images would have needed ~75 GB before training started. Here a dataset's
image column stays where ``datasets`` keeps it (Arrow, memory-mapped from disk, still
compressed), and a batch decodes only its own images.

Training batches are augmented as the paper's authors trained (RandomResizedCrop to the model's
input size, horizontal flip, then the model's normalisation); evaluation and Fisher batches only
go through the model's own image processor (resize, rescale, normalise). The transforms are
kornia's: torchvision's PyPI wheels are built against CUDA torch and do not import next to the
pinned CPU torch (``operator torchvision::nms does not exist``), while kornia is pure torch.
kornia draws from torch's global generator, so each batch draws inside ``torch.random.fork_rng``
seeded from (seed, round, client, step): the same batch gets the same pixels on any engine and
for every strategy of a comparison, and the process's generator is left as it was.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedhello.core.seeds import Purpose, derived_int

# Kornia's defaults are torchvision's: scale (0.08, 1), aspect ratio (3/4, 4/3).
CROP_SCALE = (0.08, 1.0)


def image_part(table: Any, column: str) -> Any:
    """One split's image column, undecoded: a one-column ``datasets.Dataset`` whose Image
    feature yields the stored bytes (Arrow, memory-mapped), or a plain list (a pandas table,
    already in memory: paths or arrays)."""
    if hasattr(table, "select_columns"):
        import datasets

        part = table.select_columns([column])
        if isinstance(part.features[column], datasets.Image):
            part = part.cast_column(column, datasets.Image(decode=False))
        return part
    return list(table[column])


class ImageColumn(Sequence[Any]):
    """A lazy view of images held by several splits' tables: position ``i`` of the
    concatenation (optionally through ``index``), read only when asked for."""

    def __init__(self, parts: list[Any], rows: np.ndarray | None = None) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else int(self.offsets[-1])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        i = int(i) + len(self) if int(i) < 0 else int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} of {len(self)}")
        return self.take([i])[0]

    def subset(self, positions: Sequence[int] | np.ndarray) -> ImageColumn:
        """The images at ``positions`` (row ``j`` of the result is ``positions[j]``), lazily."""
        return ImageColumn(self.parts, self._global(np.asarray(positions, dtype=np.int64)))

    def _global(self, positions: np.ndarray) -> np.ndarray:
        return self.rows[positions] if self.rows is not None else positions

    def take(self, positions: Sequence[int] | np.ndarray) -> list[Any]:
        """The stored images at ``positions``, in that order (one read per table)."""
        pos = self._global(np.asarray(positions, dtype=np.int64))
        part_of = np.searchsorted(self.offsets, pos, side="right") - 1
        out: list[Any] = [None] * len(pos)
        for k in np.unique(part_of):
            sel = np.flatnonzero(part_of == k)
            rows = (pos[sel] - self.offsets[k]).tolist()
            part = self.parts[k]
            if isinstance(part, list):
                values = [part[r] for r in rows]
            else:
                values = part[rows][part.column_names[0]]
            for i, value in zip(sel, values, strict=True):
                out[i] = value
        return out


def as_image(x: Any) -> Any:
    """A PIL RGB image from what a dataset stores: a PIL image, datasets' undecoded
    ``{"bytes", "path"}``, a file path, or an array (H x W or H x W x C, uint8 or [0, 1])."""
    from PIL import Image

    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, dict) and (x.get("bytes") or x.get("path")):
        source = io.BytesIO(x["bytes"]) if x.get("bytes") else x["path"]
        return Image.open(source).convert("RGB")
    if isinstance(x, str):
        return Image.open(x).convert("RGB")
    arr = np.asarray(x)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255 if arr.max() <= 1 else 1), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


class ImageData:
    """Model inputs of an image task, made per batch: the ``ModelInputs`` interface (``batch``,
    ``labels``, ``length_order``) over an :class:`ImageColumn`."""

    trim = False

    def __init__(self, images: ImageColumn, labels: Any, processor: Any, augment: bool) -> None:
        self.images = images
        self.labels = labels
        self.processor = processor
        self.augment = augment
        self._size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def length_order(self, idx: np.ndarray) -> np.ndarray:
        return np.arange(len(idx))

    def batch(
        self, idx: Sequence[int] | np.ndarray, augment: tuple[int, ...] | None = None
    ) -> dict[str, Any]:
        """Pixels and labels of the examples at ``idx``. ``augment`` = (seed, round, client,
        step) of a training step: augmented (if ``data.augment``), else the processor's."""
        import torch

        index = np.asarray(idx, dtype=np.int64)
        images = [as_image(x) for x in self.images.take(index)]
        if augment is not None and self.augment:
            pixels = self._augmented(images, augment)
        else:
            pixels = self._processed(images)
        return {"pixel_values": pixels, "labels": self.labels[torch.as_tensor(index)]}

    def _processed(self, images: list[Any]) -> Any:
        return self.processor(images=images, return_tensors="pt")["pixel_values"].float()

    def output_size(self, sample: Any) -> tuple[int, int]:
        """The (height, width) the model takes: what its processor makes of an image."""
        if self._size is None:
            h, w = self._processed([sample]).shape[-2:]
            self._size = (int(h), int(w))
        return self._size

    def _augmented(self, images: list[Any], key: tuple[int, ...]) -> Any:
        import torch
        from kornia.augmentation import RandomHorizontalFlip, RandomResizedCrop

        size = self.output_size(images[0])
        crop = RandomResizedCrop(size, scale=CROP_SCALE)
        flip = RandomHorizontalFlip()
        seed, *rest = key
        out = []
        # the CPU generator alone (the images are augmented on the CPU): ``torch.manual_seed``
        # would also reseed CUDA, which ``fork_rng(devices=[])`` does not restore, and the
        # step's dropout on a GPU would draw from the augmentation's seed
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(derived_int(seed, Purpose.AUGMENT, *rest))
            for image in images:  # one at a time: a dataset's images may differ in size
                x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
                x = x.permute(2, 0, 1)[None].float() / 255.0
                out.append(flip(crop(x)))
        return self._normalised(torch.cat(out))

    def _normalised(self, pixels: Any) -> Any:
        """The processor's normalisation of [0, 1] pixels (ViT: mean 0.5, std 0.5)."""
        import torch

        p = self.processor
        if not getattr(p, "do_normalize", False):
            return pixels.contiguous()
        mean = torch.tensor(p.image_mean, dtype=pixels.dtype).view(1, -1, 1, 1)
        std = torch.tensor(p.image_std, dtype=pixels.dtype).view(1, -1, 1, 1)
        return ((pixels - mean) / std).contiguous()
