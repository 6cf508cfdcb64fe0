"""FedRA's client model as its authors built it: only the allocated blocks, in order.

FedRA's own code hands each client a smaller model made of its allocated transformer blocks
(the forward pass skips the others), so a weak client saves forward compute and activation
memory too, not only the backward below its lowest block. fedhello keeps one shared model and,
for the duration of a client's local training, swaps the model's block list for the allocated
blocks: the same parameter objects, so the masks, optimizer and upload work as for the full
model, and the list is restored afterwards (also on error).

Decoders (Llama, Qwen2, Mistral, Gemma) need two more things for the duration. Rotary position
embeddings are computed once before the blocks from the position ids, so skipping blocks
leaves them right. But where blocks differ by attention kind (Qwen2's and Gemma's sliding-window
layers), the model picks block ``i``'s mask (and Gemma its rotary table) by position in its
config's ``layer_types``, so that list is swapped for the allocated blocks' kinds too; and a KV
cache sized from the shortened list would no longer fit the blocks' own ``layer_idx``, so the
config's ``use_cache`` is off: the subnetwork trains, it never generates.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

# The block containers that fedhello.core.layers parses block indices from.
_CONTAINER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)$")


def block_container(model: torch.nn.Module, num_layers: int) -> tuple[torch.nn.Module, str]:
    """``(parent, attribute)`` of the model's list of ``num_layers`` transformer blocks."""
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module) == num_layers
            and _CONTAINER_RE.search(name)
        ):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr
    raise ValueError(f"{type(model).__name__} has no list of {num_layers} transformer blocks")


@contextmanager
def subnetwork(model: torch.nn.Module, layers: Sequence[int], num_layers: int) -> Iterator[None]:
    """Within the block, ``model`` runs only the blocks ``layers`` (in order)."""
    parent, attr = block_container(model, num_layers)
    full = getattr(parent, attr)
    chosen = sorted(layers)
    config: Any = getattr(parent, "config", None)
    kinds = getattr(config, "layer_types", None)
    swaps: dict[str, object] = {}  # config settings for the duration (see the module's doc)
    if isinstance(kinds, list) and len(kinds) == num_layers:
        swaps["layer_types"] = [kinds[i] for i in chosen]
    if getattr(config, "use_cache", None) is not None:
        swaps["use_cache"] = False
    saved = {key: getattr(config, key) for key in swaps}
    setattr(parent, attr, torch.nn.ModuleList([full[i] for i in chosen]))
    try:
        for key, value in swaps.items():
            setattr(config, key, value)
        yield
    finally:
        setattr(parent, attr, full)
        for key, value in saved.items():
            setattr(config, key, value)
