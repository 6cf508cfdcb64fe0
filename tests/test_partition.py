from __future__ import annotations

import numpy as np
import pytest

from fedhello.core.errors import DataError
from fedhello.data.partition import partition_indices

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 10, 3000)


def _check_disjoint_cover(shards: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(shards)
    assert len(joined) == len(np.unique(joined)), "shards overlap"
    assert set(joined.tolist()) <= set(range(n))
    assert all(len(s) > 0 for s in shards)


def test_iid_is_disjoint_covering_and_balanced() -> None:
    shards = partition_indices(LABELS, 8, "iid", seed=0)
    _check_disjoint_cover(shards, len(LABELS))
    assert sum(map(len, shards)) == len(LABELS)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    global_freq = np.bincount(LABELS, minlength=10) / len(LABELS)
    for s in shards:  # every IID shard looks like the whole pool
        freq = np.bincount(LABELS[s], minlength=10) / len(s)
        assert np.abs(freq - global_freq).max() < 0.06


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_at_most_k_classes_per_client(k: int) -> None:
    shards = partition_indices(LABELS, 8, "pathological", seed=0, classes_per_client=k)
    _check_disjoint_cover(shards, len(LABELS))
    for s in shards:
        assert len(np.unique(LABELS[s])) <= k


def test_dirichlet_is_skewed_and_alpha_controls_it() -> None:
    def skew(alpha: float) -> float:
        shards = partition_indices(LABELS, 8, "dirichlet", seed=0, alpha=alpha)
        _check_disjoint_cover(shards, len(LABELS))
        global_freq = np.bincount(LABELS, minlength=10) / len(LABELS)
        return float(
            np.mean(
                [
                    np.abs(np.bincount(LABELS[s], minlength=10) / len(s) - global_freq).sum()
                    for s in shards
                ]
            )
        )

    assert skew(0.1) > skew(100.0) + 0.5  # total-variation-like distance, far apart
    assert skew(100.0) < 0.3


def test_same_seed_same_shards_other_seed_differs() -> None:
    a = partition_indices(LABELS, 5, "dirichlet", seed=3)
    b = partition_indices(LABELS, 5, "dirichlet", seed=3)
    c = partition_indices(LABELS, 5, "dirichlet", seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_fewer_examples_than_clients() -> None:
    with pytest.raises(DataError, match=r"fewer than clients\.num_clients = 10"):
        partition_indices(LABELS[:5], 10, "iid", seed=0)


def test_too_many_classes_per_client() -> None:
    with pytest.raises(DataError, match=r"classes_per_client = 11.*only 10 classes"):
        partition_indices(LABELS, 4, "pathological", seed=0, classes_per_client=11)


def test_impossible_dirichlet_split_is_a_clear_error() -> None:
    with pytest.raises(DataError, match=r"cannot split 12 examples over 6 clients"):
        partition_indices(np.array([0] * 11 + [1]), 6, "dirichlet", seed=0, alpha=0.01)


@pytest.mark.parametrize("scheme", ["iid", "pathological", "dirichlet"])
def test_fast_shard_reading_equals_load_partition(scheme: str) -> None:
    """shard_positions reads the partitioners' decided index lists directly (fingerprinting
    each select is slow); it must give exactly what the public load_partition gives."""
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    from fedhello.data.partition import shard_positions

    labels = np.random.default_rng(3).integers(0, 8, 600)
    make = {
        "iid": lambda: IidPartitioner(num_partitions=5),
        "pathological": lambda: PathologicalPartitioner(
            num_partitions=5, partition_by="label", num_classes_per_partition=3, seed=1,
            class_assignment_mode="first-deterministic"),
        "dirichlet": lambda: DirichletPartitioner(
            num_partitions=5, partition_by="label", alpha=0.5, min_partition_size=5, seed=1),
    }  # fmt: skip
    table = datasets.Dataset.from_dict({"label": labels, "pos": np.arange(600)})
    fast, slow = make[scheme](), make[scheme]()
    fast.dataset = table.with_format("arrow")
    slow.dataset = table
    ours = shard_positions(fast, 5)
    theirs = [np.asarray(slow.load_partition(c)["pos"]) for c in range(5)]
    assert len(ours) == 5 and all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
