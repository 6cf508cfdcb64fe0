"""Derived random generators: every random choice owns one, keyed by (seed, round, client).

A run is a pure function of its seed: the generator for "which clients are sampled in round 7"
is ``generator(seed, Purpose.SAMPLE, 7)`` whatever happened before round 7, so any round can
be replayed and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Purpose(IntEnum):
    """Separates the streams, so that adding a draw for one purpose never shifts another."""

    SAMPLE = 1  # which clients train this round
    ALLOCATE = 2  # randomized layer allocation
    TRAIN = 3  # client batch order and dropout
    SPLIT = 4  # train/validation/test split
    PARTITION = 5  # client shards
    EVAL_SUBSET = 6  # the fixed per-round evaluation subset
    INIT = 7  # adapter and head initialisation
    PROXY = 8  # server proxy set for Fisher scores
    SITE_SPLIT = 9  # a site's own file: its training and held-out validation rows
    AUGMENT = 10  # image augmentation of a training batch (round, client, step)
    CLASS_MEANS = 11  # the examples a client sums in FedNCM's round 0 (client)
    DP_NOISE = 12  # the Gaussian noise on a DP round's per-tensor sums (round)
    DP_CLIP = 13  # the noise on adaptive clipping's count of unclipped clients (round)


def generator(seed: int, purpose: Purpose, *keys: int) -> np.random.Generator:
    """A numpy generator that depends only on ``seed``, ``purpose`` and ``keys``.

    Beware: numpy's ``SeedSequence`` pads its entropy with zeros, so ``keys`` (r) and (r, 0)
    give the same stream. Within one purpose keep the number of keys fixed (every caller does
    today); changing how streams are derived would change every published number."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(purpose), *map(int, keys)]))


def derived_int(seed: int, purpose: Purpose, *keys: int) -> int:
    """A 63-bit integer seed for libraries that take one (torch.manual_seed, partitioners)."""
    return int(generator(seed, purpose, *keys).integers(2**63 - 1))
