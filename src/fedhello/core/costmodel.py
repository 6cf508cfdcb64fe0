"""What a client's local step costs, predicted from its layer set (pure python).

A step runs the forward pass through all L blocks, then the backward pass from the head down
to the lowest trained block and no further (below it nothing needs a gradient). A frozen block
on the way down still propagates the activation gradient, which costs ``beta`` forward passes
of a block (fitted: 0.65 on MiniLM-L6 here); the LoRA weight gradients themselves are tiny.
So, in units of one block's forward pass:

    cost(S) = L + beta * (L - min(S))        (embeddings and head are negligible)

Six blocks: training only the top block costs (6 + 0.65) / (6 + 3.9) = 0.67 of training all
of them, whatever else is allocated below it; training block 0 costs the full step even alone.
Activation memory kept for backward follows the same depth: ``(L - min(S)) / L`` of the
all-layers amount.
"""

from __future__ import annotations

from collections.abc import Sequence

BETA = 0.65  # fitted on MiniLM-L6 (bench/client_cost.py): frozen-block backward ~0.65 forward


def relative_step_cost(layers: Sequence[int], num_layers: int, beta: float = BETA) -> float:
    """Predicted cost of one step relative to training every layer (1.0)."""
    if not layers:
        return 0.0
    depth = num_layers - min(layers)
    return (num_layers + beta * depth) / (num_layers * (1 + beta))


def relative_activation_memory(layers: Sequence[int], num_layers: int) -> float:
    """Predicted activation memory kept for backward, relative to training every layer."""
    return 0.0 if not layers else (num_layers - min(layers)) / num_layers


def layers_for_cost(budget: float, num_layers: int, beta: float = BETA) -> int:
    """The largest k whose cheapest placement (the top k blocks) fits a relative cost budget.

    Note the premise: only an allocation that keeps the k layers at the top stays within the
    budget; any placement reaching a shallower block costs more (see ``relative_step_cost``).
    """
    best = 0
    for k in range(1, num_layers + 1):
        if relative_step_cost(range(num_layers - k, num_layers), num_layers, beta) <= budget + 1e-9:
            best = k
    return best
