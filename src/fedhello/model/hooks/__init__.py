"""Client hooks: a method's client side as parts of the one local loop.

``base`` states the protocol (``ClientHook``: ``setup``, ``loss_term``, ``local_loop``,
``finish_upload``), ``registry`` maps the names strategies declare to hook classes, and each
other module is one behaviour: ``rank_pruning`` (HetLoRA), ``subnetwork`` (FedRA's client
model). FFA-LoRA needs none: its frozen A is the spec's factor mask (``AdapterSpec.factors``),
and a rank method's slice is the spec's rank, both applied by the loop itself.

A new hook, in a few lines::

    @register_hook
    class ShrinkHead(ClientHook):
        name = "shrink-head"

        def __init__(self, factor: float) -> None:
            self.factor = factor

        def finish_upload(self, upload):
            return {k: v * self.factor if is_head_key(k) else v for k, v in upload.items()}

and a strategy whose ``client_hooks`` returns ``(HookSpec("shrink-head", {"factor": 0.5}),)``.
"""

from __future__ import annotations

from fedhello.core.allocation import strategy_class
from fedhello.core.config import Config
from fedhello.core.hooks import HookSpec

# Importing the modules registers the hooks.
from fedhello.model.hooks import rank_pruning, subnetwork  # noqa: F401
from fedhello.model.hooks.base import ClientHook, HookChain, HookContext, LossTerm
from fedhello.model.hooks.registry import build_hooks, hook_class, hook_names, register_hook

__all__ = [
    "ClientHook",
    "HookChain",
    "HookContext",
    "HookSpec",
    "LossTerm",
    "build_hooks",
    "hook_class",
    "hook_names",
    "hooks_for",
    "register_hook",
]


def hooks_for(cfg: Config) -> tuple[HookSpec, ...]:
    """The client hooks of ``cfg``'s method, as its strategy declares them (the same on the
    server and on every Flower node: both derive them from the run's config)."""
    alloc = cfg.allocation
    return strategy_class(alloc.strategy).client_hooks(alloc.options, alloc.client_model)
