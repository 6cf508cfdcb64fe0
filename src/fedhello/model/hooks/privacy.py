"""Client-level DP's client side (``privacy.clip_on = "client"``): the client clips its own
update before it leaves, so the server never sees an unclipped one.

The update is every uploaded tensor minus the global one the client received, clipped as a
whole to the round's clip norm (``fedhello.core.privacy.mechanism.clip_upload``); the client
reports only whether it was within the norm (``unclipped``: the one bit adaptive clipping
counts, Andrew et al. 2021), never the norm itself. It runs after every other hook, on the
upload as it would otherwise leave.
"""

from __future__ import annotations

from typing import Any

from fedhello.core.aggregation import State
from fedhello.core.layers import keys_for_spec
from fedhello.core.privacy.mechanism import clip_upload
from fedhello.model.hooks.base import ClientHook, HookContext
from fedhello.model.hooks.registry import register_hook
from fedhello.model.lora import get_state


@register_hook
class ClipUpdate(ClientHook):
    """Clips the client's whole update to ``clip_norm`` (L2)."""

    name = "dp-clip"

    def __init__(self, clip_norm: float) -> None:
        self.clip_norm = float(clip_norm)
        self.received: State = {}
        self.within: bool | None = None

    def setup(self, ctx: HookContext) -> None:
        # the spec's tensors as loaded from the global state, before any step
        self.received = get_state(ctx.model, keys_for_spec(ctx.layer_of, ctx.spec))

    def finish_upload(self, upload: State) -> State:
        clipped, _, self.within = clip_upload(upload, self.received, self.clip_norm)
        return clipped

    def report(self) -> dict[str, Any]:
        return {"dp_clip_norm": self.clip_norm, "unclipped": int(bool(self.within))}
