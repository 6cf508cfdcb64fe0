from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhello.core.aggregation import (
    ClientUpdate,
    aggregate_masked,
    validate_update,
)
from fedhello.core.server_optimizers import FedAvgM

L = 3
KEYS = {f"enc.layer.{i}.q.lora_{ab}.weight": i for i in range(L) for ab in "AB"}
KEYS["classifier.modules_to_save.weight"] = None  # type: ignore[assignment]
LAYER_OF: dict[str, int | None] = dict(KEYS)


def global_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(2, 3)).astype(np.float32) for k in LAYER_OF}


def update(client: int, layers: tuple[int, ...], n: int, seed: int) -> ClientUpdate:
    rng = np.random.default_rng(seed)
    tensors = {
        k: rng.normal(size=(2, 3)).astype(np.float32)
        for k, layer in LAYER_OF.items()
        if layer is None or layer in layers
    }
    return ClientUpdate(client=client, layers=layers, num_examples=n, tensors=tensors)


def test_weighted_mean_over_the_clients_that_trained_each_layer() -> None:
    g = global_state()
    ups = [update(0, (0, 1), 10, 1), update(1, (1, 2), 30, 2), update(2, (1,), 5, 3)]
    new, report = aggregate_masked(g, ups, LAYER_OF, L)
    assert report.accepted == [0, 1, 2] and report.coverage == [1, 3, 1]
    for key, layer in LAYER_OF.items():
        holders = [u for u in ups if layer is None or layer in u.layers]
        expected = np.average(
            [u.tensors[key] for u in holders], axis=0, weights=[u.num_examples for u in holders]
        )
        np.testing.assert_allclose(new[key], expected, rtol=1e-6)


def test_untrained_layer_keeps_its_value() -> None:
    g = global_state()
    new, report = aggregate_masked(g, [update(0, (0,), 10, 1)], LAYER_OF, L)
    assert report.coverage == [1, 0, 0]
    for key, layer in LAYER_OF.items():
        if layer in (1, 2):
            np.testing.assert_array_equal(new[key], g[key])
        else:
            assert not np.array_equal(new[key], g[key])


def test_full_masks_equal_plain_fedavg() -> None:
    g = global_state()
    ups = [update(c, (0, 1, 2), n, c) for c, n in enumerate([3, 7, 11])]
    new, _ = aggregate_masked(g, ups, LAYER_OF, L)
    weights = np.array([3, 7, 11]) / 21
    for key in g:
        fedavg = sum(w * u.tensors[key] for w, u in zip(weights, ups, strict=True))
        np.testing.assert_allclose(new[key], fedavg, rtol=1e-6)


def test_unweighted_option() -> None:
    g = global_state()
    ups = [update(0, (0,), 1, 1), update(1, (0,), 99, 2)]
    new, _ = aggregate_masked(g, ups, LAYER_OF, L, "uniform")
    key = "enc.layer.0.q.lora_A.weight"
    np.testing.assert_allclose(new[key], (ups[0].tensors[key] + ups[1].tensors[key]) / 2, rtol=1e-6)


def _corrupt(kind: str) -> ClientUpdate:
    bad = update(1, (1,), 10, 5)
    tensors = dict(bad.tensors)
    if kind == "outside":
        tensors["enc.layer.2.q.lora_A.weight"] = np.zeros((2, 3), np.float32)
    elif kind == "shape":
        tensors["enc.layer.1.q.lora_A.weight"] = np.zeros((3, 2), np.float32)
    elif kind == "dtype":
        tensors["enc.layer.1.q.lora_A.weight"] = np.zeros((2, 3), np.float64)
    elif kind == "nan":
        tensors["enc.layer.1.q.lora_B.weight"] = np.full((2, 3), np.nan, np.float32)
    elif kind == "inf":
        tensors["classifier.modules_to_save.weight"] = np.full((2, 3), np.inf, np.float32)
    elif kind == "unknown":
        tensors["enc.layer.1.k.lora_A.weight"] = np.zeros((2, 3), np.float32)
    elif kind == "missing":
        del tensors["enc.layer.1.q.lora_B.weight"]
    bad.tensors = tensors
    if kind == "loss":
        bad.train_loss = float("nan")
    return bad


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("outside", "outside the allocation"),
        ("shape", "shape"),
        ("dtype", "dtype"),
        ("nan", "non-finite"),
        ("inf", "non-finite"),
        ("unknown", "unknown tensor"),
        ("missing", "missing"),
        ("loss", "loss"),
    ],
)
def test_bad_update_is_rejected_and_the_others_aggregated(kind: str, reason: str) -> None:
    g = global_state()
    good = update(0, (1,), 10, 4)
    bad = _corrupt(kind)
    assert reason in (validate_update(bad, g, LAYER_OF) or "")
    new, report = aggregate_masked(g, [good, bad], LAYER_OF, L)
    assert report.accepted == [0] and list(report.rejected) == [1]
    assert reason in report.rejected[1]
    for key in good.tensors:  # the round is exactly the good client alone
        np.testing.assert_array_equal(new[key], good.tensors[key])


def test_every_update_rejected_keeps_the_state() -> None:
    g = global_state()
    new, report = aggregate_masked(g, [_corrupt("nan")], LAYER_OF, L)
    assert report.accepted == []
    for key in g:
        np.testing.assert_array_equal(new[key], g[key])


def test_server_momentum_zero_is_fedavg_and_nonzero_accumulates() -> None:
    old = {"w": np.zeros(2, np.float32)}
    avg = {"w": np.ones(2, np.float32)}
    assert FedAvgM(1.0, 0.0).step(old, avg, {"w"}) is avg
    m = FedAvgM(1.0, 0.5)
    first = m.step(old, avg, {"w"})
    np.testing.assert_allclose(first["w"], [1, 1])
    second = m.step(first, {"w": first["w"] + 1}, {"w"})  # delta 1, velocity 0.5 + 1
    np.testing.assert_allclose(second["w"], [2.5, 2.5])


key_names = st.sampled_from([*LAYER_OF, "enc.layer.9.q.lora_A.weight", "other"])
arrays = st.one_of(
    st.builds(
        lambda v: np.full((2, 3), v, np.float32),
        st.floats(allow_nan=True, allow_infinity=True, width=32),
    ),
    st.builds(lambda v: np.full((3, 2), v, np.float32), st.floats(-1, 1, width=32)),
    st.builds(lambda v: np.full((2, 3), v, np.float64), st.floats(-1, 1)),
    st.just("not an array"),
)


@settings(max_examples=200, deadline=None)
@given(
    tensors=st.dictionaries(key_names, arrays, max_size=8),
    layers=st.lists(st.integers(0, L - 1), unique=True, max_size=L),
    num_examples=st.one_of(st.integers(-3, 50), st.just(2.5)),
    loss=st.floats(allow_nan=True, allow_infinity=True),
)
def test_fuzzed_updates_never_corrupt_the_global_state(
    tensors: dict, layers: list[int], num_examples: int, loss: float
) -> None:
    g = global_state()
    snapshot = {k: v.copy() for k, v in g.items()}
    fuzzed = ClientUpdate(9, tuple(sorted(layers)), num_examples, tensors, loss)  # type: ignore[arg-type]
    good = update(0, (0,), 10, 1)
    new, report = aggregate_masked(g, [good, fuzzed], LAYER_OF, L)
    for k in g:  # the input state is never modified in place
        np.testing.assert_array_equal(g[k], snapshot[k])
    for k, v in new.items():  # the output is always well formed
        assert v.shape == g[k].shape and v.dtype == g[k].dtype and np.isfinite(v).all()
    if 9 in report.accepted:
        assert validate_update(fuzzed, g, LAYER_OF) is None
    else:
        assert 9 in report.rejected
        for k in good.tensors:
            np.testing.assert_array_equal(new[k], good.tensors[k])
