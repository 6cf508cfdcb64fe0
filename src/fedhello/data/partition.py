"""Client shards of the training pool: IID, pathological (k classes per client, every class
held: ``class_cycle``) and Dirichlet(alpha) label skew, with flwr-datasets' partitioners.

The partition depends only on the run seed, never on the strategy, so every strategy of a
comparison sees the same shards.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

from fedhello.core.errors import DataError
from fedhello.core.seeds import Purpose, derived_int, generator

logger = logging.getLogger(__name__)


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 5,
) -> list[np.ndarray]:
    """Positions into ``labels`` (the training pool) for each client; disjoint, each non-empty."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    from fedhello.data.class_cycle import ClassCyclePartitioner

    n = len(labels)
    if n < num_clients:
        raise DataError(
            f"the training pool has {n} examples, fewer than clients.num_clients = {num_clients}"
        )
    num_classes = len(np.unique(labels))
    if num_classes < 2 and scheme != "iid":
        # e.g. a causal-LM dataset without a category column: one class cannot be skewed (and
        # a cached dataset reused by another partition must be refused here, not only on load)
        raise DataError(
            f"data.partition = {scheme!r}: the training pool has one class, which cannot be "
            "split by label; allowed: partition = 'iid', or data.label_column naming a "
            "category column"
        )
    part_seed = derived_int(seed, Purpose.PARTITION) % (2**32)
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif scheme == "pathological":
        if classes_per_client > num_classes:
            raise DataError(
                f"data.classes_per_client = {classes_per_client}: the data has only "
                f"{num_classes} classes; allowed: 1..{num_classes}"
            )
        if num_clients * classes_per_client < num_classes:
            logger.warning(
                "pathological partition: %d clients x %d classes cannot hold all %d classes; "
                "%d classes will have no holder",
                num_clients, classes_per_client, num_classes,
                num_classes - num_clients * classes_per_client,
            )  # fmt: skip
        partitioner = ClassCyclePartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            seed=part_seed,
        )
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min(10, n // num_clients),
            self_balancing=False,
            seed=part_seed,
        )
    else:
        raise DataError(f"data.partition = {scheme!r}: allowed: iid, pathological, dirichlet")
    table = datasets.Dataset.from_dict({"label": labels.astype(np.int64), "pos": np.arange(n)})
    # arrow format: column reads (ours and the partitioners') return arrays instead of
    # iterating row by row, which took tens of seconds on 82k examples
    table = table.with_format("arrow")
    if scheme == "iid":  # IidPartitioner keeps order: shuffle the pool with our seed first
        table = table.shuffle(seed=part_seed)
    partitioner.dataset = table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "classes will NOT be used" is reported below instead
        try:
            shards = shard_positions(partitioner, num_clients)
        except ValueError as err:  # e.g. Dirichlet cannot give every client a minimum share
            raise DataError(
                f"data.partition = {scheme!r} cannot split {n} examples over {num_clients} "
                f"clients ({err}); use fewer clients, more data or another partition"
            ) from None
    empty = [c for c, s in enumerate(shards) if len(s) == 0]
    if empty:
        raise DataError(
            f"data.partition = {scheme!r} left clients {empty} without data; use fewer clients, "
            "a larger data.dirichlet_alpha or more data.classes_per_client"
        )
    used = len(np.unique(labels[np.concatenate(shards)]))
    logger.info("partition %s: shard sizes %s, %d/%d classes used", scheme,
                [len(s) for s in shards], used, num_classes)  # fmt: skip
    return shards


def shard_positions(partitioner: Any, num_clients: int) -> list[np.ndarray]:
    """Each client's ``pos`` values, as ``partitioner.load_partition`` would select them.

    Label-based partitioners decide every partition's indices on the first call and then
    ``Dataset.select`` them; ``datasets`` fingerprints each select by pickling the index list
    (about a second per client on 82k examples). Their index lists are read directly when
    present (tests/test_partition.py checks they equal ``load_partition``).
    """
    first = np.asarray(partitioner.load_partition(0)["pos"], dtype=np.int64)
    decided = getattr(partitioner, "_partition_id_to_indices", None)
    if not isinstance(decided, dict) or len(decided) != num_clients:
        rest = [partitioner.load_partition(c)["pos"] for c in range(1, num_clients)]
        return [first, *(np.asarray(r, dtype=np.int64) for r in rest)]
    pos = np.asarray(partitioner.dataset["pos"], dtype=np.int64)
    return [first] + [pos[np.asarray(decided[c], dtype=np.int64)] for c in range(1, num_clients)]


def hold_out_proxy(train: np.ndarray, n: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(proxy, remaining training pool): the server's labelled proxy set for Fisher scores.

    Held out for every strategy, Fisher-based or not, so that all strategies of a comparison
    see the same client shards; it depends on the data's split seed alone."""
    if n > len(train) // 2:
        raise DataError(
            f"allocation.proxy_examples = {n}: the training pool has only {len(train)} examples "
            "(the Fisher proxy set is held out for every strategy, Fisher-based or not, so that "
            "compared strategies see the same client shards); allowed: at most half of it "
            f"({len(train) // 2}): lower allocation.proxy_examples"
        )
    perm = generator(split_seed, Purpose.PROXY).permutation(len(train))
    return np.sort(train[perm[:n]]), np.sort(train[perm[n:]])
