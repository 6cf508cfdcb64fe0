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
_FACTOR_RE = re.compile(r"(?:^|\.)lora_(A|B)(?:\.|$)")

# Which LoRA factors a client trains and uploads: both (LoRA), or B alone (FFA-LoRA: A stays
# at its shared initialisation, so the average of the uploads is the exact average update).
FACTOR_SETS = ("AB", "B")  # the LoRA factors a client trains: both, or B alone (FFA-LoRA)
# What a client does with the head in a round (``fedhello.core.heads.head_mode`` decides it from
# ``train.head``): train and upload it (federated), neither (frozen), or train it without
# uploading it (local: the Fed-HeLLo authors' code).
HEAD_MODES = ("federated", "frozen", "local")


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


def lora_factor(name: str) -> str | None:
    """``"A"`` (shape ``r x in``: rank on axis 0) or ``"B"`` (``out x r``: rank on axis 1) for a
    LoRA factor, None for the head.

    >>> lora_factor("bert.encoder.layer.0.attention.self.query.lora_B.default.weight")
    'B'
    """
    m = _FACTOR_RE.search(name)
    return m.group(1) if m else None


def layer_of_keys(keys: Iterable[str], num_layers: int) -> dict[str, int | None]:
    """``key -> block`` for a model's adapter keys; checks that every block has LoRA tensors."""
    mapping = {k: layer_index_of(k) for k in keys}
    seen = {v for v in mapping.values() if v is not None}
    if seen != set(range(num_layers)):
        raise ValueError(f"LoRA tensors cover blocks {sorted(seen)}, expected 0..{num_layers - 1}")
    return mapping


@dataclass(frozen=True)
class AdapterSpec:
    """A client's share of the adapter: these layers, at this rank, these factors.

    ``rank`` None is the adapter's full rank (every layer strategy); a rank method hands out
    the leading ``rank`` components (``A[:r, :]``, ``B[:, :r]``) of every block. ``factors``
    is ``"AB"`` or ``"B"`` (FFA-LoRA). ``head`` (``HEAD_MODES``): the head is trained and
    uploaded (``federated``, the default), neither (``frozen``), or trained but not uploaded
    (``local``).
    """

    layers: tuple[int, ...]
    rank: int | None = None
    factors: str = "AB"
    head: str = "federated"

    def __post_init__(self) -> None:
        if self.factors not in FACTOR_SETS:
            raise ValueError(f"factors = {self.factors!r}; allowed: {', '.join(FACTOR_SETS)}")
        if self.head not in HEAD_MODES:
            raise ValueError(f"head = {self.head!r}; allowed: {', '.join(HEAD_MODES)}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank = {self.rank}; allowed: at least 1")


@dataclass(frozen=True)
class ClientAllocation:
    """The layers one client trains in one round (sorted, distinct), at a rank (None: full)
    and with the LoRA ``factors`` it trains; ``head``: what it does with the head (the
    round's, set by the server's loop: ``AdapterSpec.head``)."""

    client: int
    budget: int
    layers: tuple[int, ...]
    repaired_from: tuple[int, ...] | None = None  # the strategy's set, when the fit repaired it
    rank: int | None = None
    factors: str = "AB"
    head: str = "federated"

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(self.layers, self.rank, self.factors, self.head)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "client": self.client, "budget": self.budget, "layers": list(self.layers),
        }  # fmt: skip
        if self.rank is not None:
            out["rank"] = self.rank
        if self.factors != "AB":
            out["factors"] = self.factors
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


def keys_for_spec(
    layer_of: Mapping[str, int | None], spec: AdapterSpec, *, trained: bool = False
) -> list[str]:
    """The tensors a client with ``spec`` uploads: the LoRA factors of its layers (both, or B
    alone) plus the head where ``spec.head`` is ``federated``; with ``trained``, those it
    trains: the head also where it is ``local`` (trained, never uploaded). The one rule, used by
    the server (what to accept) and by every client (what to train and send)."""
    chosen = set(spec.layers)
    head = spec.head == "federated" or (trained and spec.head == "local")
    return [
        k
        for k, layer in layer_of.items()
        if (head if layer is None else layer in chosen)
        and (layer is None or spec.factors == "AB" or lora_factor(k) == "B")
    ]


def keys_for_layers(layer_of: Mapping[str, int | None], layers: Iterable[int]) -> list[str]:
    """``keys_for_spec`` of a full-rank, both-factor spec: the layers' LoRA tensors + head."""
    return keys_for_spec(layer_of, AdapterSpec(tuple(layers)))
