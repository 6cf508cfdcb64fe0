"""Which pooling a classifier reads its encoder through: the rule, and why.

``model.pooling``:

- ``"auto"`` (the default):
  1. a model that declares its pooling (a sentence-transformers folder: ``modules.json`` names
     a ``Pooling`` module whose ``config.json`` sets ``pooling_mode_mean_tokens``, ``..._cls_token``
     or ``..._max_tokens``) is classified from that pooling: the pooling it was trained to be
     read with (all-MiniLM-L6-v2 and all-mpnet-base-v2 declare the mean);
  2. otherwise, a model whose classification head reads a pooler (BERT's ``pooler.dense`` on the
     first token) that was never trained (missing from the checkpoint, or its bias exactly zero,
     which a trained layer never has) is classified from the masked mean of its token states;
  3. otherwise transformers' own head, as built (BERT-base's trained pooler, ViT's head on its
     class token, MPNet's and RoBERTa's classification heads without a declaration).
- ``"mean"``, ``"cls"``, ``"max"``: that pooling, whatever the model declares.
- ``"head"``: transformers' own head as built, its pooler frozen as loaded (how every run before
  pooling existed was made; a run's own config.toml reads this way).

Why the mean, not a trained pooler, in case 2: without a declaration nothing says how the
encoder was meant to be read, and the masked mean needs no weights: a trained pooler would put
a hidden x hidden layer (147k parameters for MiniLM, 590k for a base model) into every client's
upload and learn it from random under label skew; the mean is the sentence-transformers
default for encoders and leaves the head a single linear layer. The choice is logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fedhello.core.errors import ModelError

logger = logging.getLogger(__name__)

AUTO, HEAD = "auto", "head"
# sentence-transformers' Pooling config keys -> fedhello's pooling names
DECLARED_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


def model_file(source: str, name: str, hub: bool = False) -> Path | None:
    """``name`` of the model at ``source``: in its folder, or (``hub``: a hub id, downloads on)
    from the hub's cache or the hub; None where it has none."""
    local = Path(source) / name
    if local.is_file() or not hub or Path(source).exists():
        return local if local.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(source, name))
    except LocalEntryNotFoundError as err:  # offline and not cached: unknown, not absent
        reason = f"it is not in the hub cache and the hub cannot be reached ({err})"
    except EntryNotFoundError:  # the hub answered: the model has no such file
        return None
    except (OSError, ValueError) as err:  # no answer (network, 5xx, 429): unknown, not absent
        reason = f"the hub did not answer ({type(err).__name__}: {err})"
    raise ModelError(
        f"model.name = {source!r}: cannot read {name} (its pooling declaration): "
        f"{' '.join(reason.split())[:300]}; allowed: retry, or set model.pooling (mean, cls, "
        "max or head) to skip the declaration"
    )


def declared_pooling(source: str, hub: bool = False) -> str | None:
    """The pooling a sentence-transformers model declares, or None (no ``modules.json``, no
    Pooling module, or a mode fedhello does not implement: that is logged and the rule goes
    on). ``source``: a folder; with ``hub``, a hub id (its two small files are fetched as
    transformers fetches the weights: a hub model is read as the one saved locally)."""
    modules_file = model_file(source, "modules.json", hub)
    if modules_file is None:
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        entry = next(m for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        pooling_file = model_file(source, f"{entry['path']}/config.json", hub)
        if pooling_file is None:
            return None
        config = json.loads(pooling_file.read_text("utf-8"))
    except (StopIteration, OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError):
        return None
    modes = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
    if len(modes) == 1 and modes[0] in DECLARED_MODES:
        return DECLARED_MODES[modes[0]]
    logger.warning(
        "%s declares pooling %s, which fedhello does not implement (allowed: one of %s): "
        "not used", source, modes, ", ".join(DECLARED_MODES),
    )  # fmt: skip
    return None


def untrained_pooler(model: Any, missing_keys: set[str] | list[str]) -> str | None:
    """Why the pooler ``model``'s head reads is untrained (missing from the checkpoint, or a
    bias of exact zeros), or None: no pooler read (RoBERTa, MPNet and ViT heads build their
    base without one), or a trained one."""
    base = getattr(model, "base_model", None)
    pooler = getattr(base, "pooler", None)
    dense = getattr(pooler, "dense", None)
    if dense is None:
        return None
    if any(".pooler." in f".{k}" for k in missing_keys):
        return "its checkpoint has no pooler weights (newly initialised)"
    bias = getattr(dense, "bias", None)
    if bias is not None and not bool(bias.detach().any()):
        return "its pooler.dense bias is exactly zero, as initialised: it was never trained"
    return None


def check_pooling(requested: str, poolable: bool, name: str) -> None:
    """One line for a pooling the model's kind cannot be read with (a pooled head exists for
    text and multiple choice, not for images: ViT's head already reads its class token)."""
    if requested not in (AUTO, HEAD) and not poolable:
        raise ModelError(
            f"model.pooling = {requested!r}: {name} has no pooled head; allowed: auto or head"
        )


def pooled_module_file() -> Path:
    """The pooled head's module (``fedhello.model.pooled``), self-contained: copied beside an
    adapter or a merged model as the code plain transformers loads it with."""
    return Path(__file__).with_name("pooled.py")
