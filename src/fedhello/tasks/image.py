"""Image classification (CIFAR-100 on ViT): ``data.image_column`` holds the images.

Images are not encoded once like texts: their pixels are large, so the column stays a lazy
:class:`~fedhello.data.images.ImageColumn` (nothing decoded while reading) and each batch is
decoded, resized and, in training, augmented per batch (:class:`~fedhello.data.images.ImageData`).
``model.max_length`` does not apply. ``model.task = "auto"`` picks this kind for the vision
model types below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedhello.core.config import DataConfig
from fedhello.data.columns import check_column
from fedhello.data.images import ImageColumn, ImageData, image_part
from fedhello.tasks.base import Task

if TYPE_CHECKING:
    import torch

    from fedhello.data.kinds import ModelInputs

# transformers ``model_type`` values of vision backbones (their config.json): "auto" -> image.
IMAGE_MODEL_TYPES = {
    "vit",
    "deit",
    "beit",
    "swin",
    "dinov2",
    "convnext",
    "swinv2",
    "data2vec-vision",
}


class ImageTask(Task):
    """Image classification with the model's image processor; images decoded per batch."""

    name = "image"
    head = "ImageClassification"
    uses_max_length = False

    def input_columns(self, cfg: DataConfig) -> list[tuple[str, str]]:
        return [(cfg.image_column, "image_column")]

    def read_inputs(self, tables: Mapping[str, Any], cfg: DataConfig) -> Sequence[Any]:
        """A lazy view of every table's image column: memory does not grow with the images."""
        return ImageColumn([_image_part(table, cfg) for table in tables.values()])

    def encode(
        self,
        inputs: Sequence[Any],
        labels: torch.Tensor,
        processor: Any,
        max_length: int,
        augment: bool,
    ) -> ModelInputs:
        """Images made per batch, augmented in training batches when ``augment``."""
        images = inputs
        if not isinstance(images, ImageColumn):  # images in memory (a list): same interface
            images = ImageColumn([list(images)])
        return ImageData(images, labels, processor, augment)

    def detects(self, model_config: Mapping[str, Any]) -> bool:
        return model_config.get("model_type") in IMAGE_MODEL_TYPES

    def load_processor(self, source: str, offline: bool) -> Any:
        """The model's image processor (resize, rescale, normalise)."""
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(source, local_files_only=offline)

    def synthetic_batch(
        self, model: Any, batch_size: int, max_length: int, num_labels: int
    ) -> dict[str, torch.Tensor]:
        """Random full-size images: the model's ``image_size`` and ``num_channels``."""
        import torch

        gen = torch.Generator().manual_seed(0)
        config = model.config
        labels = torch.randint(0, num_labels, (batch_size,), generator=gen)
        size = int(getattr(config, "image_size", 224))
        channels = int(getattr(config, "num_channels", 3))
        pixels = torch.randn(batch_size, channels, size, size, generator=gen)
        return {"pixel_values": pixels, "labels": labels}


def _image_part(table: Any, cfg: DataConfig) -> Any:
    check_column(table, cfg.image_column, "image", "image_column", cfg.name)
    return image_part(table, cfg.image_column)
