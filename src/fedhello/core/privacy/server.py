"""The server's side of client-level DP: one round's private aggregate, the adaptive clip norm
it carries to the next round (checkpointed), and the epsilon spent so far.

Round by round (``PrivateAggregator.aggregate``): every accepted update is checked against the
round's clip norm (``clip_on = "client"``: an update above it was not clipped and is rejected,
never clipped silently; one within float32's rounding of it is projected onto it) or clipped
here (``"server"``); the clipped updates are summed per tensor with noise
(``fedhello.core.privacy.mechanism.noisy_mean``); with adaptive clipping the noisy count of
unclipped clients moves the clip norm for the next round.

Where the randomness comes from (``privacy.noise``): with ``"secret"`` the noise, the count's
noise and the client sampling come from a 128-bit key drawn from the operating system for each
run, kept in the server's checkpoints (so a resumed run draws the same) and nowhere else: the
released models, metrics, summary and config never hold it. With ``"seeded"`` they come from
(``run.seed``, purpose, round): reproducible and paired across strategies, and void as a
guarantee against anyone who knows the seed.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhello.core.layers import AllocationPlan, keys_for_spec
from fedhello.core.privacy import accountant
from fedhello.core.privacy.mechanism import (
    CLIP_TOLERANCE,
    layer_noise,
    next_clip_norm,
    noisy_mean,
    norm_of,
    update_noise_multiplier,
    update_of,
)
from fedhello.core.seeds import Purpose, generator

if TYPE_CHECKING:
    from fedhello.core.aggregation import ClientUpdate, State
    from fedhello.core.config import Config

logger = logging.getLogger(__name__)

PREFIX = "privacy/"  # the DP server's tensors among a checkpoint's server tensors
STATE_KEY = PREFIX + "clip_norm"  # the adaptive clip norm
KEY_STATE = PREFIX + "noise_key"  # the secret noise key (four 32-bit words), noise = "secret"


@dataclass(frozen=True)
class Accounting:
    """What the accountant needs of a config: the sampling, the noise and the delta."""

    num_clients: int
    per_round: int
    noise_multiplier: float
    delta: float

    @classmethod
    def of(cls, cfg: Config) -> Accounting:
        p, c = cfg.privacy, cfg.clients
        delta = p.delta if p.delta is not None else accountant.default_delta(c.num_clients)
        return cls(c.num_clients, c.per_round, p.noise_multiplier or 0.0, delta)

    def epsilon(self, rounds: int) -> float:
        return accountant.epsilon(
            rounds, self.num_clients, self.per_round, self.noise_multiplier, self.delta
        )


def private_rounds(cfg: Config) -> int:
    """How many of ``federation.rounds`` a DP run trains: all of them, or the last round whose
    epsilon is within ``privacy.target_epsilon`` (0: round 1 already exceeds it)."""
    p, rounds = cfg.privacy, cfg.federation.rounds
    if not p.enabled or p.target_epsilon is None:
        return rounds
    a = Accounting.of(cfg)
    return accountant.rounds_within(
        p.target_epsilon, rounds, a.num_clients, a.per_round, a.noise_multiplier, a.delta
    )


def planned_counts(plan: AllocationPlan, layer_of: Mapping[str, int | None]) -> dict[str, int]:
    """Per tensor, how many of ``plan``'s clients it gives the tensor (a client without layers
    sits out)."""
    planned: dict[str, int] = {}
    for alloc in plan.clients:
        if alloc.layers:
            for key in keys_for_spec(layer_of, alloc.spec):
                planned[key] = planned.get(key, 0) + 1
    return planned


def expected_counts(
    population: AllocationPlan, layer_of: Mapping[str, int | None], per_round: int
) -> dict[str, float]:
    """Per tensor, the expected number of a round's ``per_round`` sampled clients that train
    it: ``per_round`` x the share of all clients whose allocation (``population``: the plan of
    the round for every client) holds it. The denominator of its noisy mean and the tensors
    the round's noise moves: public, whoever was sampled (``fedhello.core.privacy.mechanism``).
    Every strategy allocates a client from its budget, the round and the seed alone, so this
    is the planned count's expectation over the sampling."""
    n = len(population.clients)
    return {k: per_round * c / n for k, c in planned_counts(population, layer_of).items()}


def expected_trainers(population: AllocationPlan, per_round: int) -> float:
    """The expected number of a round's sampled clients with layers to train: adaptive
    clipping's public denominator for its count of unclipped updates, and the head's
    expected count where the head is averaged."""
    training = sum(1 for a in population.clients if a.layers)
    return per_round * training / len(population.clients)


def expected_layer_counts(population: AllocationPlan, per_round: int) -> list[float]:
    """``expected_counts`` per layer, then the head (a layer's tensors share its count): what
    ``fedhello plan`` shows and divides the noise by, without the model's tensor names."""
    n = len(population.clients)
    layers = [per_round * c / n for c in population.coverage()]
    return [*layers, expected_trainers(population, per_round)]


def scaled(update: State, factor: float) -> State:
    return {k: v * factor for k, v in update.items()} if factor != 1.0 else update


def json_number(x: float) -> float | None:
    """A number JSON can hold: infinity (no noise) is recorded as null."""
    return None if math.isinf(x) else x


class PrivateAggregator:
    """One run's DP server: checks or clips the updates, adds the noise, adapts the clip norm."""

    def __init__(self, cfg: Config) -> None:
        p = cfg.privacy
        self.cfg = cfg
        self.clip_norm = p.clip_norm
        self.adaptive = p.clipping == "adaptive"
        self.count_noise = (p.count_noise or cfg.clients.per_round / 20) if self.adaptive else None
        self.update_multiplier = update_noise_multiplier(
            p.noise_multiplier or 0.0, self.count_noise
        )
        self.accounting = Accounting.of(cfg)
        # the operating system's randomness, never the seed: see the module's docstring
        self.key = secrets.randbits(128) if p.noise == "secret" else None
        self.warned_low_count = False  # an expected count below 1, said once per run

    @property
    def sampling_seed(self) -> int:
        """What the round's client sample derives from: the secret key, or ``run.seed``."""
        return self.cfg.run.seed if self.key is None else self.key

    def stream(self, purpose: Purpose, round_: int) -> np.random.Generator:
        return generator(self.sampling_seed, purpose, round_)

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {STATE_KEY: np.array([self.clip_norm], dtype=np.float64)}
        if self.key is not None:
            words = [(self.key >> (32 * i)) & 0xFFFFFFFF for i in range(4)]
            state[KEY_STATE] = np.array(words, dtype=np.uint32)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if STATE_KEY in state:
            self.clip_norm = float(state[STATE_KEY][0])
        if KEY_STATE in state and self.key is not None:
            self.key = sum(int(w) << (32 * i) for i, w in enumerate(state[KEY_STATE]))

    def warn_low_counts(
        self, expected: Mapping[str, float], layer_of: Mapping[str, int | None], per_round: int,
        round_: int,
    ) -> None:  # fmt: skip
        """Say once per run that a layer's expected count is below 1: a lone contributor's
        update, and the noise, are then multiplied by up to 1 / count."""
        layers = {layer_of[k] for k, c in expected.items() if c < 1}
        low = [str(x) for x in sorted(x for x in layers if x is not None)]
        low += ["the head"] if None in layers else []
        if low:
            self.warned_low_count = True
            logger.warning(
                "round %d: layers %s are expected to be trained by fewer than 1 of the %d "
                "sampled clients: a lone contributor's update is multiplied by up to %.3g, and "
                "so is the noise on them (more per-round, or an allocation that spreads them)",
                round_, ", ".join(low), per_round,
                1 / min(expected.values()),
            )  # fmt: skip

    def aggregate(
        self,
        global_state: State,
        updates: Sequence[ClientUpdate],
        unclipped: Mapping[int, int | None],
        population: AllocationPlan,
        layer_of: Mapping[str, int | None],
        round_: int,
    ) -> tuple[State, dict[int, str], dict[str, Any]]:
        """(the new means, the clients rejected here with why, the round's privacy record)
        from the accepted ``updates``; ``unclipped``: each client's report that its update was
        within the clip norm (client-side clipping); ``population``: the round's allocation
        of every client, whose expected counts divide the sums (``expected_counts``)."""
        p, clip = self.cfg.privacy, self.clip_norm
        per_round = self.cfg.clients.per_round
        expected = expected_counts(population, layer_of, per_round)
        if not self.warned_low_count:
            self.warn_low_counts(expected, layer_of, per_round, round_)

        deltas, bits, rejected = [], 0, {}
        for u in updates:
            delta = update_of(u.tensors, global_state)
            norm = norm_of(delta)
            if p.clip_on == "server":  # clipped here, in float64: exactly within C
                deltas.append(scaled(delta, min(1.0, clip / norm) if norm > 0 else 1.0))
                bits += int(norm <= clip)
                continue
            if norm > clip * (1 + CLIP_TOLERANCE):
                rejected[u.client] = (
                    f"update norm {norm:.6g} exceeds the round's clip norm {clip:.6g} "
                    "(privacy.clip_on = client: the client must clip before it uploads)"
                )
                continue
            bit = unclipped.get(u.client)
            if bit is not None and bit not in (0, 1):  # a count of bits: any other would
                rejected[u.client] = (  # overflow the next clip norm or drive it to 0
                    f"unclipped = {bit!r}; allowed: 0 or 1 (clipped, or within the clip norm)"
                )
                continue
            if self.adaptive and bit is None:
                rejected[u.client] = "no 'unclipped' report: adaptive clipping needs it"
                continue
            # a client-clipped upload arrives rounded to float32: projected onto C exactly
            deltas.append(scaled(delta, min(1.0, clip / norm)) if norm > clip else delta)
            bits += int(bit or 0)
        for client, reason in rejected.items():
            logger.warning("rejected the update of client %d: %s", client, reason)
        noise_std = self.update_multiplier * clip
        # one generator per tensor, by its place among all the state's tensors: a tensor's
        # noise does not depend on which others a strategy noises
        index = {k: i for i, k in enumerate(sorted(global_state))}

        def rng_for(key: str) -> np.random.Generator:
            return generator(self.sampling_seed, Purpose.DP_NOISE, round_, index[key])

        result = noisy_mean(global_state, deltas, expected, noise_std, rng_for)
        record: dict[str, Any] = {
            "clip_norm": round(clip, 8),
            "noise_multiplier": round(self.update_multiplier, 8),
            **layer_noise(result, layer_of, population.num_layers),
        }
        trainers = expected_trainers(population, per_round)
        if self.adaptive and trainers > 0:
            assert self.count_noise is not None
            self.clip_norm, share = next_clip_norm(
                clip, bits, trainers, p.target_quantile, p.clip_lr, self.count_noise,
                self.stream(Purpose.DP_CLIP, round_),
            )  # fmt: skip
            record["unclipped_share"] = round(share, 6)  # the noisy share that moved C
        epsilon = self.accounting.epsilon(round_)
        record |= {"epsilon": json_number(epsilon), "delta": self.accounting.delta}
        return result.state, rejected, record
