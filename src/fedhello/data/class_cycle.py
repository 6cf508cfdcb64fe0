"""The pathological split as the paper's authors made it: every client holds exactly k classes
drawn from a cyclic shuffled class sampler, so every class has the same number of holders (up
to one), and each class is split among its holders by Dirichlet quantities with a minimum share.

flwr-datasets' ``PathologicalPartitioner`` assigns classes ``first-deterministic`` (client i
takes classes i, i+1, ... of a shuffled list) or at random, and either can leave classes with
no holder: with 12 clients, 26 classes and 5 per client, seeds 0-4 left 2-4 classes held by
nobody, whose training data was discarded while they stayed in the test set. The cycle below
covers every class as soon as ``clients * k >= classes``. Written on flwr-datasets'
``Partitioner`` base, so it composes with the rest of flwr-datasets.

The authors' sampler reshuffles with numpy's global generator and may hand a client the same
class twice at a cycle boundary; here each client's k classes are distinct and every draw comes
from one seeded generator.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import Partitioner

# The smallest share of a class a holder gets (the authors used 10 on CIFAR-100 with k > 3),
# lowered to what the class affords when it has too few examples for its holders.
MIN_SHARE = 10


def cyclic_class_assignment(
    classes: list[int], num_clients: int, k: int, rng: np.random.Generator
) -> list[list[int]]:
    """k distinct classes per client, dealt from a cycle of shuffled class lists: each full
    pass gives every class one holder. A class a client already holds is skipped for it and
    stays first in line for the next client."""
    queue: list[int] = []
    out = []
    for _ in range(num_clients):
        chosen: list[int] = []
        while len(chosen) < k:
            pos = next((i for i, c in enumerate(queue) if c not in chosen), None)
            if pos is None:  # the queue is empty or holds only this client's classes
                queue.extend(int(c) for c in rng.permutation(classes))
                continue
            chosen.append(queue.pop(pos))
        out.append(chosen)
    return out


def dirichlet_shares(
    n: int, holders: int, beta: float, min_share: int, rng: np.random.Generator
) -> np.ndarray:
    """How many of a class's ``n`` examples each of its ``holders`` gets: ``min_share`` each
    (or what ``n`` affords), the rest by Dirichlet(beta) proportions, remainders to random
    holders. Sums to ``n``."""
    floor = min(min_share, n // holders)
    rest = n - floor * holders
    shares = np.floor(rng.dirichlet([beta] * holders) * rest).astype(np.int64)
    for i in rng.choice(holders, rest - int(shares.sum())):
        shares[i] += 1
    return shares + floor


class ClassCyclePartitioner(Partitioner):
    """k classes per partition from a cyclic class sampler; each class split among its holders
    by Dirichlet(``beta``) quantities with a minimum share (see the module docstring)."""

    def __init__(
        self,
        num_partitions: int,
        partition_by: str,
        num_classes_per_partition: int,
        seed: int,
        beta: float = 1.0,
        min_share: int = MIN_SHARE,
    ) -> None:
        super().__init__()
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._k = num_classes_per_partition
        self._seed = seed
        self._beta = beta
        self._min_share = min_share
        self._partition_id_to_indices: dict[int, list[int]] = {}
        self.classes_of: list[list[int]] = []

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def _decide(self) -> None:
        labels = np.asarray(self.dataset[self._partition_by])
        classes = sorted(int(c) for c in np.unique(labels))
        if self._k > len(classes):
            raise ValueError(
                f"{self._k} classes per partition, but the data has {len(classes)} classes"
            )
        rng = np.random.default_rng(self._seed)
        self.classes_of = cyclic_class_assignment(classes, self._num_partitions, self._k, rng)
        holders: dict[int, list[int]] = {c: [] for c in classes}
        for client, owned in enumerate(self.classes_of):
            for c in owned:
                holders[c].append(client)
        parts: list[list[int]] = [[] for _ in range(self._num_partitions)]
        for c in classes:
            if not holders[c]:
                continue  # only when clients * k < classes: no one can hold it
            rows = rng.permutation(np.flatnonzero(labels == c))
            shares = dirichlet_shares(len(rows), len(holders[c]), self._beta, self._min_share, rng)
            pieces = np.split(rows, np.cumsum(shares)[:-1])
            for client, piece in zip(holders[c], pieces, strict=True):
                parts[client].extend(int(i) for i in piece)
        self._partition_id_to_indices = {i: sorted(p) for i, p in enumerate(parts)}

    def load_partition(self, partition_id: int) -> Dataset:
        if not self._partition_id_to_indices:
            self._decide()
        return self.dataset.select(self._partition_id_to_indices[partition_id])
