"""The privacy accountant: epsilon of a DP federation after each round, from Google's
``dp-accounting`` (its Rényi-DP accountant).

Why this library and this accountant: ``dp-accounting`` is torch-free (numpy and scipy, as the
rest of the core), maintained with the DP libraries of TensorFlow Privacy and JAX Privacy, and
its RDP accountant is the one that models fedhello's sampler exactly. fedhello samples
``per_round`` of the ``num_clients`` clients each round uniformly *without replacement*
(``fedhello.core.schedule.sample_clients``), not by Poisson sampling, so the mechanism is the
Gaussian mechanism on a fixed-size subsample, whose amplification is known under the
*replace-one* neighbouring relation (Wang, Balle and Kasiviswanathan, AISTATS 2019, Theorem 27:
``SampledWithoutReplacementDpEvent``). Opacus's accountants and the PLD accountant assume Poisson
sampling (add/remove one), which fedhello's sampler does not do. (Opacus 1.6 also installs here,
but needs torch, which the core does not import.)

Under replace-one, one client's data swapped for another's moves a sum of updates clipped to
``C`` by up to ``2 C``, so noise of standard deviation ``z C`` is, for the accountant, a Gaussian
mechanism of noise multiplier ``z / 2``. The round is one such release (every tensor's sum is
one vector query with the whole update clipped jointly); rounds compose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

# one client's contribution to a sum of updates clipped to C, under replace-one: 2C
REPLACE_ONE_SENSITIVITY = 2.0


def accounting_multiplier(noise_multiplier: float) -> float:
    """The noise multiplier the accountant sees: noise std over the replace-one sensitivity,
    ``z C / (2 C)``."""
    return noise_multiplier / REPLACE_ONE_SENSITIVITY


def default_delta(num_clients: int) -> float:
    """``1 / N``: the conventional delta for N clients (``privacy.delta`` unset)."""
    return 1.0 / num_clients


def epsilon(
    rounds: int,
    num_clients: int,
    per_round: int,
    noise_multiplier: float,
    delta: float,
    orders: Sequence[float] | None = None,
) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds, each the Gaussian mechanism of noise
    multiplier ``noise_multiplier`` (``z``: noise std ``z C``) on ``per_round`` of
    ``num_clients`` clients sampled without replacement; ``inf`` without noise, 0 for no
    round. ``orders``: the Rényi orders (default: the library's)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return _epsilon(rounds, num_clients, per_round, noise_multiplier, delta, tuple(orders or ()))


@lru_cache(maxsize=256)
def _epsilon(
    rounds: int,
    num_clients: int,
    per_round: int,
    noise_multiplier: float,
    delta: float,
    orders: tuple[float, ...],
) -> float:
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant(
        orders=list(orders) or None,
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
    )
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        num_clients, per_round,
        dp_accounting.GaussianDpEvent(accounting_multiplier(noise_multiplier)),
    )  # fmt: skip
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def rounds_within(
    target: float,
    rounds: int,
    num_clients: int,
    per_round: int,
    noise_multiplier: float,
    delta: float,
) -> int:
    """The most rounds (at most ``rounds``) whose epsilon stays within ``target``; 0 when the
    first round already exceeds it (epsilon grows with every round: a binary search)."""
    low, high = 0, rounds  # epsilon(low) <= target; the answer is in [low, high]
    while low < high:
        mid = (low + high + 1) // 2
        if epsilon(mid, num_clients, per_round, noise_multiplier, delta) <= target:
            low = mid
        else:
            high = mid - 1
    return low
