"""The client hook protocol: what a method may add to the one local training loop.

``fedhello.model.training.train_client`` is the same loop for every method. It loads the
spec's slice of the global state, masks the spec's tensors, builds the local optimizer, takes
the local steps and extracts the spec's tensors as the upload; a method's client side plugs in
at six points, in this order:

1. ``setup(ctx)``: the state is loaded and masked, the optimizer not built yet: record what the
   hook needs from the starting point (HetLoRA: the norm of the rank tail).
2. ``loss_term()``: asked once after ``setup``; a differentiable term added to the task loss at
   every step, or None (HetLoRA: its rank self-pruning regulariser; FedProx: the proximal term).
3. ``task_loss()``: asked once after ``setup``; a loss computed from the logits and labels that
   replaces the model's own cross-entropy during local training, or None (FedRS, FedLC). At most
   one hook of a client may replace it. Evaluation keeps the model's own loss.
4. ``local_loop(ctx)``: a context wrapping all local steps (FedRA's client model: only the
   allocated blocks run).
5. ``finish_upload(upload)``: the extracted tensors, to change before they leave (HetLoRA: the
   pruned rank; client-level DP: the clipped update).
6. ``report()``: what the hook adds to the client's report (``fedhello.model.report.REPORT``
   declares each field), e.g. DP's ``unclipped`` bit.

A hook is built fresh for every client and round from its ``HookSpec`` (``cls(**params)``),
so it may keep state between the five calls and never between clients. Why hooks rather than
a subclass of the loop: the loop owns everything that must stay bit-identical across methods
and engines (seeds, batch order, metering); a hook cannot reorder it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedhello.core.aggregation import State
from fedhello.core.errors import ConfigError
from fedhello.core.layers import AdapterSpec

LossTerm = Callable[[], torch.Tensor]
TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> loss


@dataclass(frozen=True)
class HookContext:
    """What a hook sees of the client's training: the shared model (the spec's state loaded,
    its tensors masked), the block of every adapter key, the spec, the trainable parameters,
    and who trains when (``client``, ``round``, ``seed``: a hook drawing random numbers derives
    its generator from them, as everything else does). ``label_counts``: how many examples of
    each class the client's shard holds (one entry per class of the model; None where the
    labels are not class ids)."""

    model: torch.nn.Module
    layer_of: Mapping[str, int | None]
    spec: AdapterSpec
    params: Sequence[torch.nn.Parameter]
    client: int
    round: int
    seed: int
    label_counts: np.ndarray | None = None


class ClientHook:
    """Base of every client hook: each method is a no-op, so a hook overrides only the points
    it needs. Subclasses set ``name`` (what a strategy's ``client_hooks`` declares) and take
    their ``HookSpec`` params as keyword arguments."""

    name: ClassVar[str]

    def setup(self, ctx: HookContext) -> None:
        """Before the optimizer is built, after the spec's state is loaded and masked."""
        del ctx

    def loss_term(self) -> LossTerm | None:
        """A term added to the task loss at every step (under the step's autocast), or None.
        Only the task loss is recorded as ``train_loss``."""
        return None

    def task_loss(self) -> TaskLoss | None:
        """A loss of (logits, labels) replacing the model's own at every step (under the
        step's autocast), or None. It is what ``train_loss`` records."""
        return None

    def local_loop(self, ctx: HookContext) -> AbstractContextManager[object]:
        """A context around all local steps; the upload is extracted after it has exited."""
        del ctx
        return nullcontext()

    def finish_upload(self, upload: State) -> State:
        """The tensors this client uploads (the spec's, as trained), possibly changed."""
        return upload

    def report(self) -> dict[str, Any]:
        """Fields of the client's report (declared in ``REPORT``), after ``finish_upload``."""
        return {}


class HookChain:
    """The hooks of one client, applied in their declared order at each point."""

    def __init__(self, hooks: Sequence[ClientHook]) -> None:
        self.hooks = list(hooks)

    def setup(self, ctx: HookContext) -> None:
        for hook in self.hooks:
            hook.setup(ctx)

    def loss_term(self) -> LossTerm | None:
        """The hooks' terms summed in order; the one term itself when there is one (so a single
        regulariser adds to the loss exactly as it did before hooks were composable)."""
        terms = [t for t in (h.loss_term() for h in self.hooks) if t is not None]
        if not terms:
            return None
        if len(terms) == 1:
            return terms[0]

        def total() -> torch.Tensor:
            out = terms[0]()
            for term in terms[1:]:
                out = out + term()
            return out

        return total

    def task_loss(self) -> TaskLoss | None:
        """The one hook's replacement of the task loss, or None; two replacements are refused
        (which one would the client minimise?)."""
        losses = [(h.name, f) for h in self.hooks if (f := h.task_loss()) is not None]
        if len(losses) > 1:
            names = ", ".join(name for name, _ in losses)
            raise ConfigError(f"client hooks {names} each replace the task loss; allowed: one")
        return losses[0][1] if losses else None

    @contextmanager
    def local_loop(self, ctx: HookContext) -> Iterator[None]:
        """Every hook's context, entered in order and exited in reverse (also on error)."""
        with ExitStack() as stack:
            for hook in self.hooks:
                stack.enter_context(hook.local_loop(ctx))
            yield

    def finish_upload(self, upload: State) -> State:
        for hook in self.hooks:
            upload = hook.finish_upload(upload)
        return upload

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for hook in self.hooks:
            out |= hook.report()
        return out
