"""FedRA's client model as a hook: during the local steps only the allocated blocks run.

The mechanism (swapping the model's block list, restored afterwards) is
``fedhello.model.subnetwork``; this hook wraps the local loop in it. A strategy gets it with
``allocation.client_model = "subnetwork"`` (``AllocationStrategy.client_hooks``).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager

from fedhello.model.hooks.base import ClientHook, HookContext
from fedhello.model.hooks.registry import register_hook
from fedhello.model.subnetwork import subnetwork


def num_blocks(layer_of: Mapping[str, int | None]) -> int:
    return 1 + max(v for v in layer_of.values() if v is not None)


@register_hook
class SubnetworkHook(ClientHook):
    """The forward pass skips the blocks outside the allocation: it saves forward compute and
    activation memory too, not only the backward below the lowest trained block."""

    name = "subnetwork"

    def local_loop(self, ctx: HookContext) -> AbstractContextManager[object]:
        return subnetwork(ctx.model, ctx.spec.layers, num_blocks(ctx.layer_of))
