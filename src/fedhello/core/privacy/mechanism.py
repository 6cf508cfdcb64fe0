"""DP-FedAvg for partial updates (McMahan et al., ICLR 2018; adaptive clipping: Andrew et al.,
NeurIPS 2021), in numpy: clipping a client's whole update, the server's noisy per-tensor mean,
and the clip norm that follows a quantile of the update norms.

A client's update is every tensor it uploads minus the global tensor it received (its
allocated layers' LoRA factors and the head), clipped *as a whole* to L2 norm ``C``: a client
that trains 2 layers and one that trains 6 each move the model by at most ``C``, so the
sensitivity is the same whatever the allocation. The server sums the clipped updates per
tensor, adds Gaussian noise of standard deviation ``z C`` to each sum, and divides by the
tensor's *expected* contributor count: ``per_round`` times the share of *all* clients whose
allocation this round holds the tensor (the strategy's plan for every client, as if each were
sampled: a client's layers depend on its budget, the round, the seed and the server's own
proxy data, never on who else was sampled). Every tensor some client's allocation holds gets
noise, trained this round or not. So the released model depends on the sample only through
the noisy sums: neither which tensors moved nor by how much they were divided tells who was
sampled. Swapping one sampled client's data for another's, its resources unchanged (budgets
are public: the expected counts depend on every client's), moves the sums by at most ``2 C``
in total, which is the replace-one sensitivity the accountant amplifies by sampling
(``fedhello.core.privacy.accountant``). The planned count, the number of this round's sampled
clients given the tensor, would not do: it differs with the sampled clients' budgets, so the
spread of a tensor's update gives away how many of each tier were sampled, and a top-tier
client would be "sampled" at its tier's rate, not ``per_round / num_clients``.

The price of a public denominator is the fixed-denominator estimator's (McMahan et al. 2018):
a tensor trained by fewer clients than expected moves less than their mean, one trained by
more moves more (unbiased over the sampling), and a failed or rejected client counts as a zero
update. With heterogeneous allocation a tensor that one client in three can train gets the
same noise ``z C`` on its sum as one every client trains, over a third of the count: three times
the noise on its mean. ``layer_noise`` reports that per layer (expected contributors, the
noise's standard deviation on the mean, the mean's RMS as estimated from the noisy mean, their
ratio).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

State = dict[str, np.ndarray]

# A client-clipped upload arrives in the state's dtype (float32): received + factor x delta,
# rounded, may exceed C by float32's relative precision times the sizes involved. An update
# whose norm exceeds C by more than this was not clipped.
CLIP_TOLERANCE = 1e-4


def update_of(tensors: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> State:
    """The update, in float64: each uploaded tensor minus the global one it received."""
    return {k: v.astype(np.float64) - received[k].astype(np.float64) for k, v in tensors.items()}


def norm_of(update: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of a whole update (every tensor's entries as one vector)."""
    return math.sqrt(sum(float(np.sum(np.square(v))) for v in update.values()))


def clip_upload(
    tensors: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], clip_norm: float
) -> tuple[State, float, bool]:
    """(the upload with its update clipped to ``clip_norm`` as a whole, the update's norm
    before clipping, whether it was within the norm): ``received + d min(1, C / ||d||)``, in
    each tensor's own dtype."""
    update = update_of(tensors, received)
    norm = norm_of(update)
    factor = 1.0 if norm <= clip_norm else clip_norm / norm
    clipped = {
        k: (received[k].astype(np.float64) + factor * d).astype(tensors[k].dtype)
        for k, d in update.items()
    }
    return clipped, norm, norm <= clip_norm


def update_noise_multiplier(noise_multiplier: float, count_noise: float | None) -> float:
    """The noise multiplier of the updates' sums: ``z`` with fixed clipping; with adaptive
    clipping, whose noisy count of unclipped clients (std ``count_noise``) is a release too,
    ``(z^-2 - (2 count_noise)^-2)^(-1/2)``, so that the round's privacy equals fixed clipping's
    at ``z`` (Andrew et al. 2021, section 3; the config refuses ``2 count_noise <= z``)."""
    if count_noise is None or noise_multiplier == 0:
        return noise_multiplier
    return float((noise_multiplier**-2 - (2 * count_noise) ** -2) ** -0.5)


@dataclass
class NoisyMean:
    """The server's private aggregate of one round: the new per-tensor means and what each
    tensor's sum held."""

    state: State  # the global state moved by each noised tensor's noisy mean update
    contributors: dict[str, float]  # expected contributor count of each noised tensor
    # each noised tensor's mean update's RMS, estimated from the noisy mean alone (what is
    # released): sqrt(max(0, mean(noisy^2) - (noise std on the mean)^2)); 0 where the noise
    # accounts for all of it
    signal_rms: dict[str, float]
    noise_std: float  # std of the noise on each sum (z C)


def noisy_mean(
    global_state: Mapping[str, np.ndarray],
    updates: Iterable[Mapping[str, np.ndarray]],
    expected: Mapping[str, float],
    noise_std: float,
    rng_for: Callable[[str], np.random.Generator],
) -> NoisyMean:
    """Per tensor of ``expected`` (key -> expected contributor count, > 0): the global tensor
    plus (the sum of the clipped ``updates`` holding it + N(0, noise_std^2) per entry) over its
    count. Each tensor's noise comes from its own generator (``rng_for(key)``), so a tensor's
    noise is the same whichever other tensors a strategy noises (paired strategies see the same
    noise) and on any engine; a tensor no client's allocation holds keeps its value."""
    sums = {k: np.zeros(global_state[k].shape, np.float64) for k in expected}
    for update in updates:
        for key, delta in update.items():
            sums[key] += delta
    state: State = {k: v.copy() for k, v in global_state.items()}
    signal: dict[str, float] = {}
    for key in sorted(expected):
        count = expected[key]
        mean = sums[key] / count
        if noise_std > 0:
            mean = mean + rng_for(key).normal(0.0, noise_std, size=mean.shape) / count
        # the noiseless mean would tell a reader one client's update where it is the only
        # contributor: the signal is estimated from the released (noisy) mean instead
        power = float(np.mean(np.square(mean))) - (noise_std / count) ** 2 if mean.size else 0.0
        signal[key] = math.sqrt(max(0.0, power))
        state[key] = (global_state[key].astype(np.float64) + mean).astype(global_state[key].dtype)
    return NoisyMean(state, dict(expected), signal, noise_std)


def layer_noise(
    result: NoisyMean, layer_of: Mapping[str, int | None], num_layers: int
) -> dict[str, Any]:
    """Per layer (the head last, as ``num_layers``): expected contributors, the noise's std on
    the mean (``z C / count``), the mean update's RMS as estimated from the noisy mean, and
    their ratio (None for a layer nobody trained, or whose estimated signal is 0: the noise
    accounts for all of the mean). Computed from released values only: the record leaks
    nothing the model does not."""
    slots = num_layers + 1
    count: list[float | None] = [None] * slots
    sq = [0.0] * slots
    size = [0] * slots
    for key, n in result.contributors.items():
        layer = layer_of[key]
        i = num_layers if layer is None else layer
        known = count[i]
        count[i] = n if known is None else min(known, n)
        entries = int(np.prod(np.shape(result.state[key])))
        sq[i] += result.signal_rms[key] ** 2 * entries
        size[i] += entries
    noise = [None if c is None else result.noise_std / c for c in count]
    rms = [math.sqrt(sq[i] / size[i]) if size[i] else None for i in range(slots)]
    ratio = [
        None if n is None or r is None or r == 0 else n / r for n, r in zip(noise, rms, strict=True)
    ]
    return {
        "dp_contributors": [None if c is None else round(c, 6) for c in count],
        "dp_noise_std": [None if n is None else round(n, 8) for n in noise],
        "dp_signal_rms": [None if r is None else round(r, 8) for r in rms],
        "dp_noise_to_signal": [None if x is None else round(x, 4) for x in ratio],
    }


def next_clip_norm(
    clip_norm: float,
    unclipped: int,
    expected: float,
    quantile: float,
    clip_lr: float,
    count_noise: float,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Adaptive clipping's step (Andrew et al. 2021, geometric update): the noisy share of
    unclipped clients ``b = (unclipped + N(0, count_noise^2)) / expected`` and the next clip
    norm ``C exp(-clip_lr (b - quantile))``; returns (next C, b)."""
    share = (unclipped + rng.normal(0.0, count_noise)) / expected
    return clip_norm * math.exp(-clip_lr * (share - quantile)), share
