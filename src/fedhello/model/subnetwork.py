"""FedRA's client model as its authors built it: only the allocated blocks, in order.

FedRA's own code hands each client a smaller model made of its allocated transformer blocks
(the forward pass skips the others), so a weak client saves forward compute and activation
memory too, not only the backward below its lowest block. fedhello keeps one shared model and,
for the duration of a client's local training, swaps the model's block list for the allocated
blocks: the same parameter objects, so the masks, optimizer and upload work as for the full
model, and the list is restored afterwards (also on error).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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
    setattr(parent, attr, torch.nn.ModuleList([full[i] for i in sorted(layers)]))
    try:
        yield
    finally:
        setattr(parent, attr, full)
