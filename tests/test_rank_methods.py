"""The rank methods and FFA-LoRA on the aggregation boundary, against independent numpy
computations: truncation and zero-padding, HetLoRA's sparsity-weighted average, FlexLoRA's
SVD recombination, FFA-LoRA's B-only uploads, and the fair rank of a layer budget."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.linalg

from fedhello.core.aggregation import ClientUpdate, validate_update
from fedhello.core.allocation import build_strategy
from fedhello.core.allocation.hetlora import sparsity_weights
from fedhello.core.layers import AdapterSpec, keys_for_spec, lora_factor
from fedhello.core.ranks import lora_pairs, pad, rank_for_budget, rank_of, truncate

L, R, D_IN, D_OUT = 2, 4, 9, 8  # rank below both sides: truncation loses something
MODULES = [f"enc.layer.{i}.attn.{m}" for i in range(L) for m in ("query", "value")]
LAYER_OF: dict[str, int | None] = {
    f"{m}.lora_{ab}.default.weight": int(m.split(".")[2]) for m in MODULES for ab in "AB"
}
HEAD = "classifier.modules_to_save.default.weight"
LAYER_OF[HEAD] = None


def global_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"A": (R, D_IN), "B": (D_OUT, R), None: (3, D_OUT)}
    return {k: rng.normal(size=shapes[lora_factor(k)]) for k in LAYER_OF}


def upload(client: int, rank: int, n: int, seed: int) -> ClientUpdate:
    """A rank-``rank`` upload of every layer (and the head)."""
    tensors = truncate(global_state(seed), rank)
    return ClientUpdate(client, tuple(range(L)), n, tensors, rank=rank)


def hetlora() -> Any:
    s = build_strategy("hetlora", L, [L, L, L], 0)
    s.configure_adapter(R)
    return s


def test_truncation_and_zero_padding_round_trip() -> None:
    g = global_state()
    cut = truncate(g, 2)
    for key, value in g.items():
        back = pad(key, cut[key], value.shape)
        if lora_factor(key) == "A":
            np.testing.assert_array_equal(back[:2], value[:2])
            assert not back[2:].any()
        elif lora_factor(key) == "B":
            np.testing.assert_array_equal(back[:, :2], value[:, :2])
            assert not back[:, 2:].any()
        else:
            np.testing.assert_array_equal(back, value)
        np.testing.assert_array_equal(truncate({key: back}, 2)[key], cut[key])
    assert rank_of(cut) == 2 and truncate(g, None) == g


def test_fair_rank_has_the_parameters_of_the_layer_budget() -> None:
    # the example: 6 of 12 layers at rank 16 is rank 8 on all 12
    assert rank_for_budget(6, 12, 16) == 8
    assert [rank_for_budget(b, 6, 16) for b in (3, 5, 6)] == [8, 13, 16]
    assert rank_for_budget(1, 12, 4, min_rank=2) == 2  # never below the floor of the range


def test_hetlora_with_equal_ranks_and_equal_norms_is_fedavg() -> None:
    rng = np.random.default_rng(3)
    a = upload(0, R, 10, 1)
    # the second client's factors differ but their products have the same norms, module by
    # module: B2 = Q B1 and A2 = A1 P with Q, P orthogonal
    t2 = {}
    for a_key, b_key in lora_pairs(a.tensors).values():
        q = np.linalg.qr(rng.normal(size=(D_OUT, D_OUT)))[0]
        p = np.linalg.qr(rng.normal(size=(D_IN, D_IN)))[0]
        t2[b_key], t2[a_key] = q @ a.tensors[b_key], a.tensors[a_key] @ p
    t2[HEAD] = rng.normal(size=(3, D_OUT))
    b = ClientUpdate(1, tuple(range(L)), 10, t2, rank=R)
    new, report, extra = hetlora().aggregate(global_state(9), [a, b], LAYER_OF, "uniform")
    assert report.accepted == [0, 1]
    assert extra["sparsity_weights"] == {"0": 0.5, "1": 0.5}
    for key in LAYER_OF:
        np.testing.assert_allclose(new[key], (a.tensors[key] + t2[key]) / 2, rtol=1e-12)


def test_hetlora_pads_and_weighs_by_the_norm_of_each_clients_update() -> None:
    ups = [upload(0, 2, 10, 1), upload(1, 4, 20, 2), upload(2, R, 30, 3)]
    g = global_state(9)
    new, _, extra = hetlora().aggregate(g, ups, LAYER_OF, "shard")
    # S_k = ||B_k A_k||_F of the whole adapter (the block-diagonal of its modules), by hand
    norms = []
    for u in ups:
        squares = [
            np.linalg.norm(u.tensors[f"{m}.lora_B.default.weight"]
                           @ u.tensors[f"{m}.lora_A.default.weight"]) ** 2
            for m in MODULES
        ]  # fmt: skip
        norms.append(np.sqrt(sum(squares)))
    w = np.array(norms) / sum(norms)
    assert list(sparsity_weights(ups).values()) == pytest.approx(w.tolist())
    for key in LAYER_OF:
        if lora_factor(key) is None:  # the head: by examples
            want = sum(n * u.tensors[key] for n, u in zip((10, 20, 30), ups, strict=True)) / 60
        else:
            want = sum(
                wk * pad(key, u.tensors[key], g[key].shape) for wk, u in zip(w, ups, strict=True)
            )
        np.testing.assert_allclose(new[key], want, rtol=1e-10)
    assert extra["upload_ranks"] == {"0": 2, "1": 4, "2": R}


def test_hetlora_keeps_a_pruned_rank_and_restores_it_from_its_state() -> None:
    s = hetlora()
    assert s.rank_for(1, 0) == R
    s.aggregate(global_state(), [upload(0, 3, 10, 1)], LAYER_OF, "shard")  # client 0 pruned to 3
    assert s.rank_for(2, 0) == 3 and s.rank_for(2, 1) == R
    fresh = hetlora()
    fresh.load_state_dict(s.state_dict())
    assert fresh.rank_for(2, 0) == 3


def flexlora() -> Any:
    s = build_strategy("flexlora", L, [L, L, L], 0)
    s.configure_adapter(R)
    return s


def products(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {m: state[b] @ state[a] for m, (a, b) in lora_pairs(state).items()}


def test_flexlora_is_lossless_at_full_rank_when_the_update_fits_the_rank() -> None:
    # two clients of rank 2 each: their weighted sum has rank <= 4 <= R
    ups = [upload(0, 2, 10, 1), upload(1, 2, 30, 2)]
    ups = [ClientUpdate(u.client, u.layers, u.num_examples, pad_all(u.tensors), rank=R)
           for u in ups]  # fmt: skip
    new, _, extra = flexlora().aggregate(global_state(9), ups, LAYER_OF, "shard")
    got = products(new)
    for m, (a, b) in lora_pairs(LAYER_OF).items():
        want = (
            0.25 * ups[0].tensors[b] @ ups[0].tensors[a]
            + 0.75 * ups[1].tensors[b] @ ups[1].tensors[a]
        )
        np.testing.assert_allclose(got[m], want, atol=1e-10)
    for name, values in extra["singular_values"].items():  # the logged spectrum: numpy's
        layer, target = name.split(".")
        m = f"enc.layer.{layer}.attn.{target}"
        a_key, b_key = f"{m}.lora_A.default.weight", f"{m}.lora_B.default.weight"
        want = sum(
            p * u.tensors[b_key] @ u.tensors[a_key] for p, u in zip((0.25, 0.75), ups, strict=True)
        )
        np.testing.assert_allclose(
            values, np.linalg.svd(want, compute_uv=False), rtol=1e-4, atol=1e-12
        )


def pad_all(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    g = global_state()
    return {k: pad(k, v, g[k].shape) for k, v in tensors.items()}


def test_flexlora_returns_the_best_rank_r_approximation() -> None:
    ups = [upload(0, R, 10, 1), upload(1, 3, 10, 2), upload(2, R, 20, 3)]  # dW: rank 8 > R
    new, report, _ = flexlora().aggregate(global_state(9), ups, LAYER_OF, "shard")
    assert report.accepted == [0, 1, 2]
    for a, b in lora_pairs(LAYER_OF).values():
        dw = sum(
            p * u.tensors[b] @ u.tensors[a] for p, u in zip((0.25, 0.25, 0.5), ups, strict=True)
        )
        u_, s_, vt = np.linalg.svd(dw)
        for r in (R, 2, 1):  # the global adapter, and what a client of rank r receives
            cut = truncate(new, r)
            best = (u_[:, :r] * s_[:r]) @ vt[:r]
            np.testing.assert_allclose(cut[b] @ cut[a], best, atol=1e-9)


def test_flexlora_falls_back_to_gesvd_where_gesdd_does_not_converge(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where numpy's SVD (gesdd) raises, the recombination is gesvd's: the same best rank-r
    approximation, with a warning. The saved sum is the one that stopped a SmolLM2 FlexLoRA
    run in round 1 (three clients of ranks 10, 16 and 16; finite, entries up to 1e-3): on
    numpy builds whose gesdd fails on it, the recombination still factors it."""
    import fedhello.core.allocation.flexlora as fl

    saved = np.load(Path(__file__).parent / "data" / "flexlora_gesdd_failure.npz")
    products = [(float(w), saved[f"b{i}"], saved[f"a{i}"]) for i, w in enumerate(saved["weights"])]
    total = sum(p for p, _, _ in products)
    dw = sum((p / total) * (b.astype(np.float64) @ a.astype(np.float64)) for p, b, a in products)
    try:
        np.linalg.svd(dw, full_matrices=False)
        gesdd_fails = False
    except np.linalg.LinAlgError:
        gesdd_fails = True
    caplog.set_level(logging.WARNING, logger="fedhello")
    b, a, s = fl.svd_recombine(products, 16)
    want = scipy.linalg.svd(dw, full_matrices=False, lapack_driver="gesvd")
    np.testing.assert_allclose(s, want[1], rtol=1e-9, atol=1e-15)
    best = (want[0][:, :16] * want[1][:16]) @ want[2][:16]
    np.testing.assert_allclose(b @ a, best, atol=1e-12)
    assert ("did not converge" in caplog.text) == gesdd_fails

    # wherever gesdd fails, whatever the matrix
    def fails(*args: object, **kwargs: object) -> None:
        raise np.linalg.LinAlgError("SVD did not converge")

    ups = [upload(0, R, 10, 1), upload(1, 3, 10, 2), upload(2, R, 20, 3)]
    ours, _, spectra = flexlora().aggregate(global_state(9), ups, LAYER_OF, "shard")
    monkeypatch.setattr(fl.np.linalg, "svd", fails)
    theirs, _, fallback = flexlora().aggregate(global_state(9), ups, LAYER_OF, "shard")
    for a_key, b_key in lora_pairs(LAYER_OF).values():
        np.testing.assert_allclose(theirs[b_key] @ theirs[a_key], ours[b_key] @ ours[a_key],
                                   atol=1e-9)  # fmt: skip
    assert fallback["singular_values"].keys() == spectra["singular_values"].keys()


def test_ffa_lora_uploads_b_alone_and_the_server_refuses_an_a() -> None:
    spec = AdapterSpec((1,), None, "B")
    keys = keys_for_spec(LAYER_OF, spec)
    assert keys == [
        k for k in LAYER_OF if LAYER_OF[k] is None or (LAYER_OF[k] == 1 and lora_factor(k) == "B")
    ]
    g = global_state()
    tensors = {k: g[k] for k in keys}
    ok = ClientUpdate(0, (1,), 5, tensors, factors="B")
    assert validate_update(ok, g, LAYER_OF) is None
    a_key = next(k for k in LAYER_OF if LAYER_OF[k] == 1 and lora_factor(k) == "A")
    bad = ClientUpdate(0, (1,), 5, tensors | {a_key: g[a_key]}, factors="B")
    assert "frozen under FFA-LoRA" in str(validate_update(bad, g, LAYER_OF))


def test_uploads_above_the_rank_handed_out_or_of_mixed_ranks_are_rejected() -> None:
    g = global_state()
    up = upload(0, 3, 5, 1)
    assert validate_update(up, g, LAYER_OF) is None
    high = ClientUpdate(0, up.layers, 5, up.tensors, rank=2)
    assert "allowed: 1..2" in str(validate_update(high, g, LAYER_OF))
    mixed = dict(up.tensors)
    key = next(k for k in mixed if lora_factor(k) == "A")
    mixed[key] = mixed[key][:2]
    mixed_up = ClientUpdate(0, up.layers, 5, mixed, rank=3)
    assert "disagree" in str(validate_update(mixed_up, g, LAYER_OF))
    full = ClientUpdate(0, up.layers, 5, up.tensors)  # a layer strategy's client: full rank
    assert f"expected ({R}, {D_IN})" in str(validate_update(full, g, LAYER_OF))
