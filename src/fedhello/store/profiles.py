"""Cost profiles on disk: one JSON file per setting, reused by every run and comparison that
shares it, and re-measured when anything it depends on changes.

The key holds everything a step's cost depends on: the model (source, task, blocks, classes),
the LoRA shape (rank, dropout, target modules), the batch (size, tokens), the device (its
kind and name; on a CPU torch's thread count) and the precisions, the local optimizer (when
not the default AdamW) and the torch, transformers and peft versions. The file's name is a
hash of the key and the file holds the key itself: a file whose key differs from the wanted
one (an edit, a collision) or that an older probe measured (``PROFILE_VERSION``: version 1
timed 3 steps and had no checks) is measured again, never reused. Only a profile whose step
times passed their checks is stored (``fedhello.engine.resources.obtain_profile``). A run
keeps a copy of the profile it used (``profile.json`` in its directory), of whatever version
or key, so a resumed run repairs exactly as it did (a key that differs from today's is only
logged: ``key_differences``).

Profiles stored before the thread count and the transformers and peft versions were keyed
lack them, so each is measured once more. A limit checked with memory does not change: memory
is a count of bytes, the same again under the same libraries, so it affords the same layer
sets; only the step times are timed anew, now under a thread count the key names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from fedhello.core.config import Config
from fedhello.core.profile import PROFILE_VERSION, CostProfile

logger = logging.getLogger(__name__)


def profile_key(
    cfg: Config, source: str, task: str, num_layers: int, num_labels: int, device: str,
    precision: str, base_precision: str, max_length: int | None, *, on_cpu: bool,
) -> dict[str, Any]:  # fmt: skip
    """The key of a setting's profile. ``task``: the task kind's name; ``max_length``: the
    tokens per example, or None for a kind whose inputs are not token sequences (images);
    ``on_cpu``: the device is a CPU (its step times depend on torch's thread count)."""
    import peft
    import torch
    import transformers

    t = cfg.train
    # the optimizer's step time and state (memory); keyed only when not the default AdamW
    # (without FedProx's copy), so the profiles measured before the choice existed stay valid
    optimizer = (
        {} if t.optimizer == "adamw" and t.state_per_param == 2
        else {"optimizer": t.optimizer, "state_per_param": t.state_per_param}
    )  # fmt: skip
    return {
        "model": source,
        "task": task,
        "num_layers": num_layers,
        "num_labels": num_labels,
        "lora_r": cfg.lora.r,
        "lora_dropout": cfg.lora.dropout,
        "lora_target_modules": list(cfg.lora.target_modules),
        "batch_size": cfg.train.batch_size,
        "max_length": max_length,
        "device": device,
        "precision": precision,
        "base_precision": base_precision,
        "torch": torch.__version__,
        # memory can differ between versions (e.g. the attention implementation a model
        # gets by default), so both libraries are keyed whatever the device
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        # a CPU's step time scales with torch's intra-op threads; on an accelerator the host's
        # threads only queue kernels, so keying them there would re-measure for nothing
        **({"torch_threads": torch.get_num_threads()} if on_cpu else {}),
        **optimizer,
        # recomputing activations trades step time for memory: keyed only when on, so the
        # profiles measured before the option existed stay valid
        **({"gradient_checkpointing": True} if t.gradient_checkpointing else {}),
    }


def profile_dir(cfg: Config) -> Path:
    return Path(cfg.run.profile_dir or Path(cfg.run.out_dir) / "profiles")


def profile_path(directory: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return directory / f"profile-{digest}.json"


def read_profile(path: Path, key: dict[str, Any] | None = None) -> CostProfile | None:
    """The profile at ``path`` if it exists, is readable and (given ``key``: the store) has
    that key and today's format. Without ``key`` (a run's own copy) any readable version."""
    if not path.is_file():
        return None
    try:
        profile = CostProfile.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as err:
        logger.warning("cost profile %s is unreadable (%s): measuring again", path, err)
        return None
    if key is not None and profile.key != key:
        logger.warning("cost profile %s is for another setting (%s): measuring again",
                       path, ", ".join(key_differences(profile.key, key)))  # fmt: skip
        return None
    if key is not None and profile.version != PROFILE_VERSION:
        logger.warning("cost profile %s is of format %d, measured by an older probe (today's: "
                       "%d): measuring again", path, profile.version, PROFILE_VERSION)  # fmt: skip
        return None
    return profile


def key_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The names, sorted, of the key's fields whose values differ (one missing counts)."""
    return sorted(k for k in {*before, *now} if before.get(k) != now.get(k))


def write_profile(path: Path, profile: CostProfile) -> None:
    """Written whole or not at all (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(profile.to_json(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
