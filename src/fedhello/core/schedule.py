"""The federation's schedule, decided by the server alone: which clients train in round r, and
at which learning rate. Both depend only on (seed, round), never on the strategy, so every
strategy of a paired comparison sees the same client sequence.
"""

from __future__ import annotations

import math

from fedhello.core.seeds import Purpose, generator


def sample_clients(seed: int, round_: int, num_clients: int, per_round: int) -> list[int]:
    """The m clients of a round: same for every strategy with the same seed (paired runs)."""
    rng = generator(seed, Purpose.SAMPLE, round_)
    return sorted(rng.choice(num_clients, size=per_round, replace=False).tolist())


def lr_at(
    round_: int, rounds: int, lr: float, schedule: str, min_factor: float, decay: float = 0.99
) -> float:
    """Learning rate of round ``round_`` (1-based): constant, decaying to ``min_factor * lr``
    (linear, cosine), or ``lr * decay ** (round_ - 1)`` (exponential, the authors' x0.99).

    Cosine over 15 rounds from 5e-3 with factor 0.1: round 1 5e-3, round 8 2.75e-3, round 15
    5e-4; exponential from 1e-2 with 0.99: round 500 is 1e-2 x 0.99^499 = 6.6e-5. Each round's
    value is computed from scratch: no decay applied twice or skipped (the authors' code
    decayed once, ``t+1 % step``).
    """
    if schedule == "exponential":
        return lr * decay ** (round_ - 1)
    if schedule == "constant" or rounds <= 1:
        return lr
    progress = (round_ - 1) / (rounds - 1)
    if schedule == "linear":
        factor = 1 - (1 - min_factor) * progress
    else:  # cosine
        factor = min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr * factor


def num_local_steps(num_examples: int, batch_size: int, steps: int, epochs: float | None) -> int:
    """The optimizer steps the server asks of a client holding ``num_examples`` examples:
    ``train.local-steps``, or with ``train.local-epochs`` that many passes in full batches,
    rounded up (2.5 epochs of 100 examples in batches of 32: ceil(250 / 32) = 8 steps)."""
    if epochs is None:
        return steps
    return max(1, math.ceil(epochs * num_examples / batch_size))
