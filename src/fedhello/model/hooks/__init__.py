"""Client hooks: a method's client side as parts of the one local loop.

``base`` states the protocol (``ClientHook``: ``setup``, ``loss_term``, ``local_loop``,
``finish_upload``, ``report``), ``registry`` maps the names strategies declare to hook classes,
and each other module is one behaviour: ``rank_pruning`` (HetLoRA), ``subnetwork`` (FedRA's
client model), ``proximal`` (FedProx, ``train.proximal_mu``), ``losses`` (FedRS and FedLC,
``train.loss``), ``privacy`` (client-level DP's clipping on the client). FFA-LoRA needs none:
its frozen A is the spec's factor mask (``AdapterSpec.factors``), and a rank method's slice is
the spec's rank, both applied by the loop itself.

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
from fedhello.core.config import Config, TrainConfig
from fedhello.core.hooks import HookSpec

# Importing the modules registers the hooks.
from fedhello.model.hooks import losses, privacy, proximal, rank_pruning, subnetwork  # noqa: F401
from fedhello.model.hooks.base import ClientHook, HookChain, HookContext, LossTerm, TaskLoss
from fedhello.model.hooks.registry import build_hooks, hook_class, hook_names, register_hook

__all__ = [
    "ClientHook",
    "HookChain",
    "HookContext",
    "HookSpec",
    "LossTerm",
    "TaskLoss",
    "build_hooks",
    "hook_class",
    "hook_names",
    "hooks_for",
    "register_hook",
    "train_hooks",
]


def hooks_for(cfg: Config) -> tuple[HookSpec, ...]:
    """The client hooks of ``cfg``'s method, as its strategy declares them, then those of its
    local training (``train_hooks``); the same on the server and on every Flower node: both
    derive them from the run's config."""
    alloc = cfg.allocation
    own = strategy_class(alloc.strategy).client_hooks(alloc.options, alloc.client_model)
    return (*own, *train_hooks(cfg.train))


def train_hooks(t: TrainConfig) -> tuple[HookSpec, ...]:
    """The hooks local training asks for with any method: FedProx's proximal term
    (``proximal_mu > 0``) and a skew-aware loss (``loss``, resolved from ``auto`` by then:
    ``fedhello.model.recipe``; logit-adjusted by default for a classifier). The cost probe runs
    them too (``fedhello.model.probe``)."""
    hooks: list[HookSpec] = []
    if t.proximal_mu > 0:
        hooks.append(HookSpec("proximal", {"mu": t.proximal_mu}))
    if t.loss == "restricted-softmax":
        hooks.append(HookSpec("restricted-softmax", {"alpha": t.restricted_alpha}))
    elif t.loss == "logit-adjusted":
        hooks.append(HookSpec("logit-adjusted", {"tau": t.calibration_tau}))
    return tuple(hooks)
