"""Layers: which transformer block a LoRA tensor belongs to, and who trains which block.

``layer_index_of`` is the single source of truth for "which layer is this tensor". It parses
the block number as an integer, so ``layer.1`` and ``layer.11`` can never be confused (the
authors' code matched substrings: freezing layer 1 also froze layers 10 and 11).
Pure python: no torch, so planning and aggregation import this without a model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# The container of transformer blocks is called layer (BERT, ViT, MPNet), layers (Llama),
# h (GPT-2) or blocks; the block number follows it as a whole dotted component.
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)\.")
_LORA_RE = re.compile(r"(?:^|\.)lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)(?:\.|$)")


def is_lora_key(name: str) -> bool:
    """True for a LoRA tensor (``...lora_A...``/``...lora_B...``)."""
    return bool(_LORA_RE.search(name))


def layer_index_of(name: str) -> int | None:
    """Block index of a LoRA tensor, or None for tensors outside the blocks (the head).

    >>> layer_index_of("bert.encoder.layer.11.attention.self.query.lora_A.default.weight")
    11
    >>> layer_index_of("base_model.model.classifier.modules_to_save.default.weight") is None
    True
    """
    if not is_lora_key(name):
        return None
    matches = _BLOCK_RE.findall(name)
    if not matches:
        raise ValueError(f"LoRA tensor {name!r} has no block index (expected '.layer.N.')")
    return int(matches[-1])


def layer_of_keys(keys: Iterable[str], num_layers: int) -> dict[str, int | None]:
    """``key -> block`` for a model's adapter keys; checks that every block has LoRA tensors."""
    mapping = {k: layer_index_of(k) for k in keys}
    seen = {v for v in mapping.values() if v is not None}
    if seen != set(range(num_layers)):
        raise ValueError(f"LoRA tensors cover blocks {sorted(seen)}, expected 0..{num_layers - 1}")
    return mapping


@dataclass(frozen=True)
class ClientAllocation:
    """The layers one client trains in one round (sorted, distinct)."""

    client: int
    budget: int
    layers: tuple[int, ...]
    repaired_from: tuple[int, ...] | None = None  # the strategy's set, when the fit repaired it

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "client": self.client, "budget": self.budget, "layers": list(self.layers),
        }  # fmt: skip
        if self.repaired_from is not None:
            out["repaired_from"] = list(self.repaired_from)
        return out


@dataclass(frozen=True)
class AllocationPlan:
    """The allocation of one round: which client trains which layers, out of ``num_layers``."""

    round: int
    num_layers: int
    clients: tuple[ClientAllocation, ...]

    def layers_of(self, client: int) -> tuple[int, ...]:
        for alloc in self.clients:
            if alloc.client == client:
                return alloc.layers
        raise KeyError(f"client {client} is not in the plan of round {self.round}")

    def coverage(self) -> list[int]:
        """Number of clients training each layer: 6 clients x 3 layers = 18 layer-slots."""
        counts = [0] * self.num_layers
        for alloc in self.clients:
            for layer in alloc.layers:
                counts[layer] += 1
        return counts

    def as_table(self) -> list[list[str]]:
        """One row per client: client, budget, then 'x' or '.' per layer (shallow to deep)."""
        rows = []
        for alloc in self.clients:
            marks = ["x" if i in alloc.layers else "." for i in range(self.num_layers)]
            rows.append([str(alloc.client), str(alloc.budget), *marks])
        return rows


def check_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Validate a layer set: distinct, in range; returned sorted."""
    out = tuple(sorted(int(x) for x in layers))
    if len(set(out)) != len(out):
        raise ValueError(f"layer set {list(layers)} repeats a layer")
    if out and (out[0] < 0 or out[-1] >= num_layers):
        raise ValueError(f"layer set {list(layers)} leaves the range 0..{num_layers - 1}")
    return out


def keys_for_layers(layer_of: Mapping[str, int | None], layers: Iterable[int]) -> list[str]:
    """The tensors a client with these layers uploads: their LoRA tensors plus the head."""
    chosen = set(layers)
    return [k for k, layer in layer_of.items() if layer is None or layer in chosen]
