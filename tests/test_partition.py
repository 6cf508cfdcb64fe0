from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

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


@settings(max_examples=60, deadline=None)
@given(
    clients=st.integers(1, 16),
    classes=st.integers(2, 30),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**31),
)
def test_pathological_holds_every_class_with_equal_holders(
    clients: int, classes: int, k: int, seed: int
) -> None:
    """Every class is held whenever clients * k >= classes (the feasible settings), each
    client holds exactly k distinct classes, and every class has the same number of holders up
    to one: each full pass of the class cycle gives every class one holder."""
    k = min(k, classes)
    assume(clients * k >= classes)
    labels = np.random.default_rng(seed).permutation(np.arange(40 * classes) % classes)
    shards = partition_indices(labels, clients, "pathological", seed, classes_per_client=k)
    _check_disjoint_cover(shards, len(labels))
    held = [set(np.unique(labels[s]).tolist()) for s in shards]
    assert set().union(*held) == set(range(classes))  # no class dropped
    assert all(len(h) == k for h in held)
    counts = np.bincount([c for h in held for c in h], minlength=classes)
    total = clients * k  # holders to deal: floor or ceil of total / classes per class
    assert counts.min() >= total // classes and counts.max() <= -(-total // classes), counts


def test_pathological_keeps_every_class_of_the_comparison_setting() -> None:
    """The comparison's setting (12 clients, 26 classes, 5 each) left 2-4 classes without a
    holder for seeds 0-4 with flwr-datasets' first-deterministic assignment."""
    labels = np.random.default_rng(0).integers(0, 26, 8000)
    for seed in range(5):
        shards = partition_indices(labels, 12, "pathological", seed, classes_per_client=5)
        assert len(np.unique(labels[np.concatenate(shards)])) == 26


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
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    from fedhello.data.class_cycle import ClassCyclePartitioner
    from fedhello.data.partition import shard_positions

    labels = np.random.default_rng(3).integers(0, 8, 600)
    make = {
        "iid": lambda: IidPartitioner(num_partitions=5),
        "pathological": lambda: ClassCyclePartitioner(
            num_partitions=5, partition_by="label", num_classes_per_partition=3, seed=1),
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
