"""What fedhello changes in PEFT's ``adapter_config.json`` of a run's adapter folder, for someone
who has only the folder: for a pooled head, ``target_modules`` pinned to the pooled model's own
module names; otherwise the list sorted (PEFT saves it in the order of Python's string
hashing). The folder's model card is ``fedhello.model.model_card``'s.

Why pin: a pooled classifier (``fedhello.model.pooled``) is loaded with its own class, not
transformers' ``AutoModelForSequenceClassification``. Loaded the stock way, PEFT matches the
saved list of target modules (``["query", "value"]``) by suffix, finds the stock model's
``bert.encoder.layer.N...`` modules, wraps them, and then finds no weights for them (the adapter
names ``encoder.encoder.layer.N...``): it only warns of missing adapter keys, keeps the LoRA at
zero, loads the head, and the head then reads BERT's pooler instead of the mean of the token
states it was trained on. That is a different model, and it makes wrong predictions without
an error. With ``target_modules`` written as a regular expression that matches exactly the
pooled model's module names (PEFT matches a string with ``re.fullmatch``), the stock route
stops with PEFT's ``ValueError`` "No modules were targeted for adaptation" (peft 0.21; it says
"Target modules ... not found in the base model" for an adapter without a saved head). The pattern
starts with a regex comment that names the class to use, for whoever reads the file. The pooled
class, ``fedhello export`` and every fedhello loader match the same modules as before.

No torch here: the engine passes the module names (``fedhello.engine.summary``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def pin_target_modules(folder: Path, module_names: Sequence[str], model_class: str) -> str:
    """Rewrite ``folder/adapter_config.json``'s ``target_modules`` to a regular expression
    that matches exactly ``module_names`` (PEFT's names of the modules it put LoRA on, relative
    to the base model), headed by a comment naming ``model_class``; returns it. Only for a
    pooled head: the module doc says why."""
    note = re.sub(r"[()]", "", f"fedhello: load onto {model_class}; see README.md here")
    names = "|".join(re.escape(n) for n in sorted(set(module_names)))
    pattern = f"(?#{note})(?:{names})"
    _rewrite_target_modules(folder, lambda saved: pattern)
    return pattern


def sort_target_modules(folder: Path) -> None:
    """Rewrite ``folder/adapter_config.json``'s ``target_modules`` list in sorted order. PEFT
    keeps it as a set and saves ``list(set)``, whose order follows Python's per-process string
    hashing (``PYTHONHASHSEED``): the same run saved ``["query", "value"]`` or ``["value",
    "query"]``, so two runs' folders differed byte for byte. PEFT reads either as the same
    set. A pattern (a string, as ``pin_target_modules`` writes) is left as it is."""
    _rewrite_target_modules(
        folder, lambda saved: sorted(saved) if isinstance(saved, list) else saved
    )


def _rewrite_target_modules(folder: Path, change: Callable[[Any], Any]) -> None:
    """``folder/adapter_config.json`` with ``target_modules`` replaced by ``change`` of the
    saved value, written as PEFT writes it (indented, keys sorted)."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["target_modules"] = change(config.get("target_modules"))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
