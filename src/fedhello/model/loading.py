"""Loading a backbone with a fresh classification head, and its tokenizer or image processor.

Local folders load with ``local_files_only`` unless downloads are allowed: nothing here waits
on a hub, and nothing here changes the process environment to ensure it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhello.core.errors import ModelError
from fedhello.model.pooling import AUTO, HEAD, check_pooling, declared_pooling, untrained_pooler
from fedhello.model.source import model_shape, resolve_model_source
from fedhello.tasks import Task, task_for

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel with a fresh classification head
    processor: Any  # what the task's inputs are made with: a tokenizer, an image processor
    task: Task  # the task kind it was built for ("auto" resolved)
    source: str  # the folder or hub name it was loaded from
    pooling: str = HEAD  # what the head reads: "head" (transformers' own) or a pooling
    pooling_reason: str = ""  # why (fedhello.model.pooling's rule)


def load_model(
    name: str,
    label_names: Sequence[str],
    task: str = "auto",
    allow_download: bool = False,
    pooling: str = AUTO,
) -> LoadedModel:
    """Load the backbone with a head for ``label_names`` (newly initialised): the head of the
    ``task`` kind (a ``model.task`` value; "auto": from the model's config), a classifier, or
    for multiple choice a scorer of each (context, choice) pair, whose ``label_names`` are the
    choices; and the kind's processor. The head reads the encoder as ``pooling`` says
    (``fedhello.model.pooling``: "auto" never leaves a classifier behind an untrained pooler)."""
    from fedhello.model.pooled import AUTO_CLASSES

    source = resolve_model_source(name, allow_download)
    id2label = dict(enumerate(label_names))
    offline = not allow_download
    labels = {
        "num_labels": len(label_names),
        "id2label": id2label,
        "label2id": {v: k for k, v in id2label.items()},
    }
    kind = task_for(model_shape(source, task)[0])
    pooled_class = AUTO_CLASSES.get(kind.export_class)  # None: the kind has no pooled head
    check_pooling(pooling, pooled_class is not None, kind.name)
    mode, why = pooling, "model.pooling"
    if pooling == AUTO:
        hub = allow_download and not Path(source).exists()  # a hub id (resolve_model_source)
        declared = declared_pooling(source, hub) if pooled_class is not None else None
        mode, why = (declared, "declared by the model") if declared else (HEAD, "")
    try:
        if mode != HEAD:
            from transformers import AutoModel

            encoder = AutoModel.from_pretrained(source, local_files_only=offline)
            model = pooled_model(pooled_class, encoder, mode, labels)
        else:
            model, info = kind.model_class().from_pretrained(
                source, local_files_only=offline, ignore_mismatched_sizes=True,
                output_loading_info=True, **labels,
            )  # fmt: skip
            untrained = untrained_pooler(model, info.get("missing_keys", ()))
            if untrained and pooling == AUTO and pooled_class is not None:
                mode, why = "mean", f"no pooling declared and {untrained}"
                model = pooled_model(pooled_class, model.base_model, mode, labels)
            elif untrained:
                logger.warning(
                    "model.pooling = 'head': the head reads a pooler that was never trained "
                    "(%s); it stays frozen (model.pooling = 'auto' reads the encoder without it)",
                    untrained,
                )
        processor = kind.load_processor(source, offline)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"model.name = {name!r}: cannot load a {kind.name} model: {first}"
        ) from None
    model.float()
    if getattr(kind, "generative", False) and hasattr(model.config, "use_cache"):
        # training and scoring forwards need no key/value cache (transformers builds one by
        # default); generation asks for it itself (fedhello.model.generation)
        model.config.use_cache = False
    reason = f"{mode} pooling ({why})" if mode != HEAD else "transformers' own head"
    logger.info("loaded %s model from %s; the head reads %s", kind.name, source, reason)
    return LoadedModel(model, processor, kind, source, mode, why)


def pooled_model(cls: Any, encoder: Any, mode: str, labels: dict[str, Any]) -> Any:
    """``cls`` (``fedhello.model.pooled``) over ``encoder`` with a fresh linear head for
    ``labels``; the pooling and the labels are recorded in the config, which export saves."""
    names = [labels["id2label"][i] for i in range(labels["num_labels"])]
    return cls.from_encoder(encoder, mode, names)
