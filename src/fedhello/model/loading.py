"""Loading a backbone with a fresh classification head, and its tokenizer or image processor.

Local folders load with ``local_files_only`` unless downloads are allowed: nothing here waits
on a hub, and nothing here changes the process environment to ensure it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedhello.core.errors import ModelError
from fedhello.model.source import model_shape, resolve_model_source

logger = logging.getLogger(__name__)


def model_class(task: str) -> Any:
    """The transformers auto class of a task: what ``load_model`` builds and exports name."""
    import transformers

    return getattr(transformers, f"AutoModelFor{TASK_CLASSES[task]}")


# Task -> the transformers head (``AutoModelFor<head>``).
TASK_CLASSES = {
    "text": "SequenceClassification",
    "image": "ImageClassification",
    "multiple-choice": "MultipleChoice",
}


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel with a fresh classification head
    processor: Any  # tokenizer (text) or image processor (image)
    task: str  # "text", "image" or "multiple-choice"
    source: str  # the folder or hub name it was loaded from


def load_model(
    name: str, label_names: Sequence[str], task: str = "auto", allow_download: bool = False
) -> LoadedModel:
    """Load the backbone with a head for ``label_names`` (newly initialised): a classifier,
    or for multiple choice a scorer of each (context, choice) pair, whose ``label_names`` are
    the choices."""
    source = resolve_model_source(name, allow_download)
    id2label = dict(enumerate(label_names))
    offline = not allow_download
    kwargs = {
        "local_files_only": offline,
        "num_labels": len(label_names),
        "id2label": id2label,
        "label2id": {v: k for k, v in id2label.items()},
        "ignore_mismatched_sizes": True,
    }
    try:
        task = model_shape(source, task)[0]
        if task == "image":
            from transformers import AutoImageProcessor

            model = model_class(task).from_pretrained(source, **kwargs)
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=offline)
        else:
            from transformers import AutoTokenizer

            model = model_class(task).from_pretrained(source, **kwargs)
            processor = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"model.name = {name!r}: cannot load a {task} model: {first}") from None
    model.float()
    logger.info("loaded %s model from %s", task, source)
    return LoadedModel(model=model, processor=processor, task=task, source=source)
