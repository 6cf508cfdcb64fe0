"""FedNCM's client side (``train.head = "class-means"``): per class, the sum of the features the
head reads, and how many examples were summed.

The features are the head's input (the pooled representation: a forward hook on the head
module, under PEFT its ``ModulesToSaveWrapper``), computed with the global state the server
sends (round 0: the initial one) in eval mode, so without dropout, under the accelerator's
autocast and summed in float64. A client sums its whole shard, up to ``CLASS_MEANS_BATCHES``
batches of ``train.eval_batch_size`` (64 x 64 = 4096 examples by default); a larger shard
sums a seeded random subset of that size (``Purpose.CLASS_MEANS``, by client), the same on
every engine. The server builds the head from the sums (``fedhello.core.heads``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from peft import PeftModel

from fedhello.core.errors import ModelError
from fedhello.core.seeds import Purpose, generator
from fedhello.model.accelerator import CPU_FP32, Accelerator
from fedhello.model.lora import head_modules, set_state
from fedhello.model.training import Shard

CLASS_MEANS_BATCHES = 64  # batches of train.eval_batch_size a client sums at most


def linear_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """``(module the forward calls, its linear layer)`` of the model's head: under PEFT the
    ``ModulesToSaveWrapper`` (its input is the classifier's input) and its original module. A
    head that is not one linear layer (RoBERTa's dense-tanh-linear) is refused in one line."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    name = head_modules(inner)[0]
    module = getattr(inner, name)
    linear = getattr(module, "original_module", module)
    if not isinstance(linear, torch.nn.Linear):
        raise ModelError(
            f"train.head = 'class-means' with a {type(linear).__name__} head ({name}): class "
            "means need one linear layer on the pooled features; allowed: model.pooling = "
            "'mean', 'cls' or 'max' (a linear head), or another train.head"
        )
    return module, linear


def has_linear_head(model: torch.nn.Module) -> bool:
    """Whether class means can build the model's head (``linear_head`` would accept it)."""
    try:
        linear_head(model)
    except ModelError:
        return False
    return True


def summed_rows(rows: np.ndarray, batch_size: int, seed: int, client: int,
                max_batches: int = CLASS_MEANS_BATCHES) -> np.ndarray:  # fmt: skip
    """The rows a client sums: all of them, or a seeded subset of ``max_batches`` batches (in
    shard order)."""
    cap = batch_size * max_batches
    if len(rows) <= cap:
        return np.asarray(rows)
    pick = generator(seed, Purpose.CLASS_MEANS, client).choice(len(rows), cap, replace=False)
    return np.asarray(rows)[np.sort(pick)]


@torch.inference_mode()
def class_feature_sums(
    model: torch.nn.Module,
    shard: Shard,
    state: Mapping[str, np.ndarray],
    batch_size: int,
    accelerator: Accelerator = CPU_FP32,
    *,
    seed: int = 0,
    client: int = 0,
    max_batches: int = CLASS_MEANS_BATCHES,
) -> tuple[np.ndarray, np.ndarray]:
    """``(sums, counts)``: per class of the head, the float64 sum of its input features over
    the summed rows of ``shard`` (``summed_rows``) and their count, with ``state`` loaded."""
    module, linear = linear_head(model)
    set_state(model, state)
    model.eval()
    sums = np.zeros((linear.out_features, linear.in_features), dtype=np.float64)
    counts = np.zeros(linear.out_features, dtype=np.int64)
    rows = summed_rows(shard.rows, batch_size, seed, client, max_batches)
    captured: list[torch.Tensor] = []

    def keep_input(_m: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: object) -> None:
        captured.append(inputs[0])

    handle = module.register_forward_hook(keep_input)
    try:
        for start in range(0, len(rows), batch_size):
            idx = rows[start : start + batch_size]
            batch = shard.data.batch(idx)
            labels = batch.pop("labels").cpu().numpy()
            captured.clear()
            with accelerator.autocast():
                model(**accelerator.to_device(batch))
            feats = captured[-1].detach().to(torch.float64).cpu().numpy()
            if feats.shape != (len(idx), linear.in_features) or labels.ndim != 1:
                raise ModelError(
                    f"train.head = 'class-means': the head reads inputs of shape "
                    f"{list(feats.shape)} for {len(idx)} examples; allowed: one feature vector "
                    "per example (a classifier on pooled features)"
                )
            if labels.size and (labels.min() < 0 or labels.max() >= linear.out_features):
                raise ModelError("train.head = 'class-means': labels outside the head's classes")
            np.add.at(sums, labels, feats)
            counts += np.bincount(labels, minlength=linear.out_features)
    finally:
        handle.remove()
    return sums, counts
