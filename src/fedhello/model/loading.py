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
from fedhello.tasks import Task, task_for

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel with a fresh classification head
    processor: Any  # what the task's inputs are made with: a tokenizer, an image processor
    task: Task  # the task kind it was built for ("auto" resolved)
    source: str  # the folder or hub name it was loaded from


def load_model(
    name: str, label_names: Sequence[str], task: str = "auto", allow_download: bool = False
) -> LoadedModel:
    """Load the backbone with a head for ``label_names`` (newly initialised): the head of the
    ``task`` kind (a ``model.task`` value; "auto": from the model's config), a classifier, or
    for multiple choice a scorer of each (context, choice) pair, whose ``label_names`` are the
    choices; and the kind's processor."""
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
    kind = task_for(model_shape(source, task)[0])
    try:
        model = kind.model_class().from_pretrained(source, **kwargs)
        processor = kind.load_processor(source, offline)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"model.name = {name!r}: cannot load a {kind.name} model: {first}"
        ) from None
    model.float()
    logger.info("loaded %s model from %s", kind.name, source)
    return LoadedModel(model=model, processor=processor, task=kind, source=source)
