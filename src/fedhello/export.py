"""A finished run as a standalone model: the LoRA merged into the base weights.

A run already holds a standard PEFT adapter (``RUN/adapter``, loadable with
``PeftModel.from_pretrained``). Many deployments want no PEFT at serving time, so ``export``
loads the base model the run was trained from, applies the adapter and its trained head,
merges the low-rank updates into the weights (``merge_and_unload``) and saves a plain
transformers model folder (safetensors) with its tokenizer or image processor and the class
names, loadable with ``AutoModelForSequenceClassification.from_pretrained(OUT)`` or
``pipeline("text-classification", OUT)``. A classifier that reads its encoder through a pooling
(``model.pooling``, ``fedhello.model.pooled``) is not a stock transformers class: its folder
carries the pooled head's code, and loads with ``trust_remote_code=True``. The merge runs on
the run's ``train.device`` and in fp32 whatever precision the run trained in (its adapter is
fp32).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from fedhello.core.errors import UserError
from fedhello.model.model_card import merged_card
from fedhello.model.pooling import HEAD, pooled_module_file
from fedhello.store.runs import RunDir, finished_run

logger = logging.getLogger(__name__)

REMOTE_MODULE = "modeling_fedhello_pooled"  # the pooled head's code in an exported folder


def check_export(run_path: Path, out: Path, overwrite: bool) -> RunDir:
    """Refuse an unfinished run or an occupied destination, before loading anything."""
    run = finished_run(run_path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--merged {str(out)!r} is a file; allowed: a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"--merged {str(out)!r} exists and is not empty; allowed: a new or empty folder, "
            "or --overwrite to replace it"
        )
    if out.resolve() == run.path.resolve() or run.path.resolve() in out.resolve().parents:
        raise UserError(f"--merged {str(out)!r} is inside the run; allowed: a folder outside it")
    return run


def export_merged(run_path: Path, out: Path, overwrite: bool = False) -> str:
    """Write the run's model with the LoRA merged in to ``out``; returns the transformers
    class that loads it (with ``trust_remote_code=True`` where ``needs_remote_code(out)``)."""
    from peft import PeftModel

    from fedhello.core.config import load_saved_config
    from fedhello.model.accelerator import resolve_device
    from fedhello.model.loading import load_model

    run = check_export(run_path, out, overwrite)
    cfg = load_saved_config(run.config_path)
    device = resolve_device(cfg.train.device)[0]  # before loading: a missing GPU fails fast
    labels = json.loads((run.adapter_dir / "labels.json").read_text())
    m = cfg.model
    loaded = load_model(m.name, labels, m.task, m.allow_download, m.pooling)
    model = PeftModel.from_pretrained(loaded.model.to(device), str(run.adapter_dir))
    # W + B A scaling on the run's device, in fp32 whatever the run's precision: the adapter
    # is fp32 and a served model should not inherit the training's rounding
    merged = model.merge_and_unload().to("cpu")
    if getattr(loaded.task, "generative", False):
        restore_generative_config(merged, loaded.source)
    # write beside, then swap: a crash mid-write leaves neither a half model under the asked-for
    # name nor a lost previous export
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    loaded.processor.save_pretrained(str(tmp))
    remote = loaded.pooling != HEAD
    if remote:
        save_pooling_code(tmp, type(merged).__name__, loaded.task.export_class)
    card = merged_card(m.name, loaded.task.export_class, remote, run.path.name)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("merged model of %s (%s) written to %s", run.path, loaded.source, out)
    return loaded.task.export_class


def needs_remote_code(folder: Path) -> bool:
    """Whether an exported folder carries its head's code (a pooled classifier)."""
    return (folder / f"{REMOTE_MODULE}.py").is_file()


def save_pooling_code(folder: Path, class_name: str, auto_class: str) -> None:
    """Make a merged pooled classifier (``fedhello.model.pooled``) loadable by plain
    transformers: its module beside the weights as remote code, named in ``auto_map``, so
    ``AutoModelFor...from_pretrained(folder, trust_remote_code=True)`` and ``pipeline`` read
    the encoder through the same pooling the run trained with (not BERT's pooler)."""
    shutil.copyfile(pooled_module_file(), folder / f"{REMOTE_MODULE}.py")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["auto_map"] = {auto_class: f"{REMOTE_MODULE}.{class_name}"}
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def restore_generative_config(model: Any, source: str) -> None:
    """A language model's config as its base ships it: training turned the key/value cache
    off (``use_cache``: a plain forward loop would run without it) and gave it the data's
    label names, which a causal LM never reads; a served model gets the base's back."""
    from transformers import AutoConfig

    base = AutoConfig.from_pretrained(source)
    model.config.use_cache = getattr(base, "use_cache", True)
    model.config.id2label, model.config.label2id = base.id2label, base.label2id
