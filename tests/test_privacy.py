"""Client-level DP for partial updates: clipping, the noise, per-tensor sums over expected
contributors (public, whoever was sampled), adaptive clipping, the accountant, the config's
refusals, and whole runs (the record, resume, the budget stopping a run, client- and
server-side clipping agreeing, DP without noise equal to FedAvg over the expected counts),
each against an independent computation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import crash_after, tiny_overrides
from safetensors.numpy import load_file

from fedhello.cli import main
from fedhello.core.config import load_config
from fedhello.core.errors import ConfigError
from fedhello.core.layers import AllocationPlan, ClientAllocation
from fedhello.core.privacy import accountant
from fedhello.core.privacy.mechanism import (
    clip_upload,
    layer_noise,
    next_clip_norm,
    noisy_mean,
    update_noise_multiplier,
)
from fedhello.core.privacy.server import PrivateAggregator
from fedhello.core.seeds import Purpose, generator
from fedhello.store.rerun import without_machine
from fedhello.store.runs import RunDir

# -- the mechanism, in numpy ---------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.01, 0.5, 1.0, 3.0, 40.0])
def test_clipping_leaves_norm_min_of_norm_and_c_in_the_same_direction(scale: float) -> None:
    rng = np.random.default_rng(1)
    received = {"a": rng.normal(size=(4, 3)).astype(np.float32), "h": np.zeros(5, np.float32)}
    step = {"a": rng.normal(size=(4, 3)), "h": rng.normal(size=5)}
    tensors = {k: (received[k] + scale * step[k]).astype(np.float32) for k in received}
    delta = np.concatenate([(tensors[k].astype(float) - received[k]).ravel() for k in "ah"])
    clipped, norm, within = clip_upload(tensors, received, 1.0)
    after = np.concatenate([(clipped[k].astype(float) - received[k]).ravel() for k in "ah"])
    assert norm == pytest.approx(np.linalg.norm(delta))
    assert within == (np.linalg.norm(delta) <= 1.0)
    assert np.linalg.norm(after) == pytest.approx(min(np.linalg.norm(delta), 1.0), rel=1e-5)
    cosine = after @ delta / (np.linalg.norm(after) * np.linalg.norm(delta))
    assert cosine == pytest.approx(1.0, abs=1e-6)
    assert all(clipped[k].dtype == np.float32 for k in clipped)


def test_the_noise_on_a_mean_has_std_noise_over_count() -> None:
    g = {"w": np.zeros((400, 500), np.float32), "untouched": np.ones(3, np.float32)}
    out = noisy_mean(g, [], {"w": 4}, noise_std=2.0, rng_for=lambda k: np.random.default_rng(0))
    assert np.std(out.state["w"]) == pytest.approx(2.0 / 4, rel=0.01)  # 200,000 draws
    assert abs(np.mean(out.state["w"])) < 0.005
    np.testing.assert_array_equal(out.state["untouched"], g["untouched"])  # nobody planned: kept


def test_per_tensor_sums_over_expected_contributors_for_a_heterogeneous_allocation() -> None:
    rng = np.random.default_rng(3)
    keys = ["l0", "l1", "l2", "head"]
    g = {k: rng.normal(size=(3, 2)).astype(np.float32) for k in keys}
    # three clients trained {0,1}, {1,2}, {2}, all the head; the denominators are expected
    # counts (fractions: per_round x a share of all clients), not who came
    holds = [("l0", "l1", "head"), ("l1", "l2", "head"), ("l2", "head")]
    deltas = [{k: rng.normal(size=(3, 2)) for k in h} for h in holds]
    planned = {"l0": 2.0, "l1": 2.0, "l2": 2.0, "head": 4.0}
    out = noisy_mean(g, deltas, planned, 0.0, lambda k: np.random.default_rng(0))
    for key in keys:
        total = sum((d[key] for d in deltas if key in d), np.zeros((3, 2)))
        want = (g[key].astype(np.float64) + total / planned[key]).astype(np.float32)
        np.testing.assert_array_equal(out.state[key], want)
    # per layer: contributors, the noise on the mean, the mean's RMS and their ratio
    noisy = noisy_mean(g, deltas, planned, 0.3, lambda k: np.random.default_rng(keys.index(k)))
    layer_of = {"l0": 0, "l1": 1, "l2": 2, "head": None}
    info = layer_noise(noisy, layer_of, 3)
    assert info["dp_contributors"] == [2, 2, 2, 4]
    assert info["dp_noise_std"] == [0.15, 0.15, 0.15, 0.075]
    # the signal is estimated from the released (noisy) mean alone: never the noiseless one
    released = noisy.state["l1"].astype(np.float64) - g["l1"]
    rms1 = np.sqrt(max(0.0, np.mean(np.square(released)) - 0.15**2))
    assert info["dp_signal_rms"][1] == pytest.approx(rms1, rel=1e-4, abs=1e-6)
    if rms1 > 0:
        assert info["dp_noise_to_signal"][1] == pytest.approx(0.15 / rms1, rel=1e-3)
    # and it is an estimate of the true mean's RMS: 200,000 entries, within 1%
    big_g = {"w": np.zeros(200_000, np.float32)}
    true = [{"w": np.random.default_rng(k).normal(0, 0.5, 200_000)} for k in range(2)]
    big = noisy_mean(big_g, true, {"w": 2}, 0.4, lambda k: np.random.default_rng(9))
    want = np.sqrt(np.mean(np.square((true[0]["w"] + true[1]["w"]) / 2)))
    assert big.signal_rms["w"] == pytest.approx(want, rel=0.01)


def _population(round_: int, layers: list[tuple[int, ...]]) -> AllocationPlan:
    return AllocationPlan(
        round_, 3, tuple(ClientAllocation(c, len(ls), ls) for c, ls in enumerate(layers))
    )


def test_expected_counts_are_per_round_times_the_share_of_all_clients() -> None:
    """Ten clients: four can train layer 0 (the top tier), all can train layer 2 and the head,
    one trains nothing this round; 5 are sampled a round."""
    from fedhello.core.privacy.server import expected_counts, expected_trainers

    layer_of = {"l0.A": 0, "l0.B": 0, "l1.A": 1, "l2.A": 2, "head": None}
    layers = [(0, 1, 2)] * 4 + [(1, 2)] * 3 + [(2,)] * 2 + [()]
    counts = expected_counts(_population(1, layers), layer_of, per_round=5)
    assert counts == {"l0.A": 2.0, "l0.B": 2.0, "l1.A": 3.5, "l2.A": 4.5, "head": 4.5}
    assert expected_trainers(_population(1, layers), 5) == 4.5


def _private(tmp_path: Path, **extra: object) -> PrivateAggregator:
    sets = ["privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0", "privacy.noise=seeded",
            "clients.num_clients=10", "clients.per_round=5",
            *[f"{k.replace('__', '.')}={v}" for k, v in extra.items()]]  # fmt: skip
    return PrivateAggregator(load_config(None, sets))


def test_the_released_model_does_not_depend_on_who_was_sampled(tmp_path: Path) -> None:
    """Two samples of 5 out of the same 10 clients, one with the top tier (layers 0-2), one
    without, every sampled update zero: the same released model bit for bit. The noise lands
    on every tensor some client can train, over public counts, so neither which tensors moved
    nor their spread tells which tier was sampled (with planned counts layer 0 would move only
    when a top-tier client came, by a noise std that counts them)."""
    from fedhello.core.aggregation import ClientUpdate

    layer_of = {"l0": 0, "l1": 1, "l2": 2, "head": None}
    g = {k: np.zeros(2000, np.float32) for k in layer_of}
    layers = [(0, 1, 2)] * 4 + [(1, 2)] * 3 + [(2,)] * 3
    population = _population(1, layers)
    released = []
    for sample in ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9]):
        holds = {c: [k for k in layer_of if layer_of[k] in (*layers[c], None)] for c in sample}
        updates = [ClientUpdate(c, layers[c], 10, {k: g[k] for k in holds[c]}) for c in sample]
        state, rejected, _ = _private(tmp_path).aggregate(g, updates, {}, population, layer_of, 1)
        assert not rejected and all(np.any(state[k] != 0) for k in layer_of)
        released.append(state)
    for k in layer_of:
        np.testing.assert_array_equal(released[0][k], released[1][k])
    # each tensor's noise: std z C / expected count (layer 0: 5 x 4/10 = 2 expected)
    assert np.std(released[0]["l0"]) == pytest.approx(1.0 / 2.0, rel=0.05)
    assert np.std(released[0]["head"]) == pytest.approx(1.0 / 5.0, rel=0.05)


def test_an_expected_count_below_one_is_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Layer 0 only 1 client of 10 can train, 5 sampled: expected 0.5, so a lone contributor's
    update (and the noise) is doubled: said once, not every round."""
    import logging

    layer_of = {"l0": 0, "l1": 1, "l2": 2, "head": None}
    g = {k: np.zeros(4, np.float32) for k in layer_of}
    agg = _private(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedhello"):
        for r in (1, 2):
            agg.aggregate(g, [], {}, _population(r, [(0, 1, 2)] + [(1, 2)] * 9), layer_of, r)
    warned = [m for m in caplog.messages if "fewer than 1" in m]
    assert len(warned) == 1 and "layers 0 are expected" in warned[0] and "up to 2" in warned[0]


def test_a_tensors_noise_is_the_same_whichever_others_a_strategy_noises(tmp_path: Path) -> None:
    """Paired strategies of one seed see the same noise on the tensors both noise: one
    generator per tensor, not one stream through whichever tensors a plan holds."""
    layer_of = {"l0": 0, "l1": 1, "l2": 2, "head": None}
    g = {k: np.zeros(50, np.float32) for k in layer_of}
    deep = _population(1, [(1, 2)] * 10)  # deepest layers only: l0 never noised
    full = _population(1, [(0, 1, 2)] * 10)
    a = _private(tmp_path).aggregate(g, [], {}, deep, layer_of, 1)[0]
    b = _private(tmp_path).aggregate(g, [], {}, full, layer_of, 1)[0]
    np.testing.assert_array_equal(a["l0"], g["l0"])  # nobody can train it: no noise
    for k in ("l1", "l2", "head"):
        np.testing.assert_array_equal(a[k], b[k])


def test_adaptive_clipping_steps_geometrically_towards_the_quantile() -> None:
    c, share = next_clip_norm(2.0, unclipped=5, expected=6, quantile=0.5, clip_lr=0.2,
                              count_noise=0.3, rng=generator(7, Purpose.DP_CLIP, 3))  # fmt: skip
    noise = generator(7, Purpose.DP_CLIP, 3).normal(0.0, 0.3)
    assert share == pytest.approx((5 + noise) / 6)
    assert c == pytest.approx(2.0 * math.exp(-0.2 * ((5 + noise) / 6 - 0.5)))
    # Andrew et al.: z_delta^-2 = z^-2 - (2 sigma_b)^-2
    assert update_noise_multiplier(1.0, 2.0) == pytest.approx((1 - 1 / 16) ** -0.5)
    assert update_noise_multiplier(1.0, None) == 1.0


# -- the accountant ------------------------------------------------------------------------------


def test_epsilon_matches_the_librarys_own_gaussian_example() -> None:
    """dp-accounting's test: noise multiplier 4.530877117 is exactly (1, 1e-6)-DP. Sampling
    every client (q = 1) is that Gaussian, at fedhello's z = 2 x 4.530877117 (replace-one: the
    accountant sees z / 2)."""
    orders = [0.001 * i for i in range(1000, 100000)]
    eps = accountant.epsilon(1, 10, 10, 2 * 4.530877117, 1e-6, orders=orders)
    assert eps == pytest.approx(1.0, abs=1e-4)


def test_epsilon_is_the_subsampled_gaussian_without_replacement_at_half_the_noise() -> None:
    """fedhello's sampler is fixed-size without replacement: the library's RDP of that
    mechanism (Wang, Balle, Kasiviswanathan 2019, Theorem 27) at noise multiplier z / 2
    (replace-one sensitivity 2C), composed over the rounds, is fedhello's epsilon; Poisson
    sampling under add/remove (the usual DP-SGD accounting) would claim far less."""
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    orders = list(range(2, 129))
    per_round = rdp._compute_rdp_sample_wor_gaussian(6 / 100, 1.0 / 2, orders)
    eps, _ = rdp.compute_epsilon(orders, 15 * np.asarray(per_round), 0.01)
    ours = accountant.epsilon(15, 100, 6, 1.0, 0.01, orders=orders)
    assert ours == pytest.approx(eps, rel=1e-9)
    assert accountant.epsilon(15, 100, 6, 1.0, 0.01) == pytest.approx(8.19, abs=0.01)
    poisson = rdp._compute_rdp_poisson_subsampled_gaussian(6 / 100, 1.0, orders)
    assert rdp.compute_epsilon(orders, 15 * np.asarray(poisson), 0.01)[0] < ours / 5


def test_epsilon_grows_with_rounds_shrinks_with_noise_and_sampling() -> None:
    eps = [accountant.epsilon(t, 100, 10, 1.5, 0.01) for t in (1, 5, 20)]
    assert eps[0] < eps[1] < eps[2]
    assert accountant.epsilon(20, 100, 10, 3.0, 0.01) < eps[2]
    assert accountant.epsilon(20, 100, 5, 1.5, 0.01) < eps[2]
    assert accountant.epsilon(3, 100, 10, 0.0, 0.01) == math.inf
    assert accountant.epsilon(0, 100, 10, 1.5, 0.01) == 0.0
    # the most rounds within a target, against a plain scan
    for target in (0.5, eps[1], 4.0, 1e9):
        scan = max([t for t in range(0, 21)
                    if accountant.epsilon(t, 100, 10, 1.5, 0.01) <= target])  # fmt: skip
        assert accountant.rounds_within(target, 20, 100, 10, 1.5, 0.01) == scan


# -- the config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["privacy.noise_multiplier=-1"], "config: privacy.noise_multiplier = -1"),
        (["privacy.noise_multiplier=1", "privacy.clip_norm=0"], "config: privacy.clip_norm = 0"),
        (["privacy.noise_multiplier=1", 'allocation.strategy="hetlora"'],
         "config: privacy.noise_multiplier with allocation.strategy = 'hetlora'"),
        (["privacy.noise_multiplier=1", 'train.head="class-means"'],
         "config: privacy.noise_multiplier with train.head = 'class-means'"),
        (["privacy.noise_multiplier=1", 'federation.weighting="shard"'],
         "config: federation.weighting = 'shard' with privacy.noise_multiplier"),
        (["privacy.target_epsilon=8"],
         "config: privacy.target_epsilon without privacy.noise_multiplier"),
        (["privacy.clip_norm=2"], "config: privacy.clip_norm without privacy.noise_multiplier"),
        (["privacy.noise_multiplier=1", "privacy.delta=0.5"],
         "config: privacy.delta = 0.5 with clients.num_clients = 12: above 1/N = 0.08333"),
        (["privacy.noise_multiplier=0", "privacy.target_epsilon=3"],
         "config: privacy.target_epsilon = 3 with noise_multiplier = 0"),
        (["privacy.noise_multiplier=1", 'privacy.clipping="adaptive"'],
         "config: privacy.count_noise (default clients.per_round / 20 = 0.3) with "
         "noise_multiplier = 1"),
    ],
)  # fmt: skip
def test_bad_privacy_settings_are_one_line(overrides: list[str], start: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(start)
    assert "\n" not in str(err.value)


def test_dp_is_off_by_default_and_weighs_uniformly_when_on() -> None:
    off = load_config(None, [])
    assert not off.privacy.enabled and "privacy" not in off.to_dict()
    on = load_config(None, ["privacy.noise_multiplier=1"])
    assert on.federation.weighting == "uniform" and "privacy" in on.to_toml()


def test_a_target_that_round_one_exceeds_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    one = accountant.epsilon(1, 12, 6, 0.5, 1 / 12)
    code = main(["run", "--out", str(out), "--set", "privacy.noise_multiplier=0.5",
                 "--set", f"privacy.target_epsilon={one / 2}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"fedhello: error: privacy.target_epsilon = {one / 2:g}: one round")
    assert not out.exists()


# -- whole runs ----------------------------------------------------------------------------------


def _overrides(model: Path, data: Path, **extra: object) -> list[str]:
    settings: dict[str, object] = {
        "data__text_column": '"sentence"', "data__label_column": '"topic"',
        "federation__rounds": 3, "run__keep_checkpoints": 3, "train__lr": 0.02,
        "privacy__noise_multiplier": 0.3, "privacy__clip_norm": 0.05,
        "privacy__noise": '"seeded"',  # paired runs below: the secret key's tests set their own
    }  # fmt: skip
    return tiny_overrides(model, data, **(settings | extra))


def _run(out: Path, overrides: list[str], *extra: str) -> int:
    args = ["run", "--out", str(out), *extra]
    for o in overrides:
        args += ["--set", o]
    return main(args)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_text_csv: Path):
    out = tmp_path_factory.mktemp("dp") / "run"
    assert _run(out, _overrides(tiny_bert_dir, tiny_text_csv)) == 0
    return out


def test_each_round_records_its_privacy(dp_run: Path) -> None:
    run = RunDir(dp_run)
    records, summary = run.read_metrics(), run.read_summary()
    cfg = load_config(run.config_path)
    from fedhello.core.allocation import build_strategy

    assert cfg.allocation.strategy == "fedra" and summary["num_layers"] == 4
    strategy = build_strategy("fedra", 4, [2, 2, 3, 3, 4, 4], seed=cfg.run.seed)
    for r in records:
        eps = accountant.epsilon(r["round"], 6, 3, 0.3, 1 / 6)
        assert r["epsilon"] == pytest.approx(eps) and r["delta"] == pytest.approx(1 / 6)
        assert r["clip_norm"] == 0.05 and r["noise_multiplier"] == 0.3
        # contributors per layer: expected, per_round x the share of all 6 clients whose
        # allocation this round holds it (FedRA's, as the strategy draws it for each client;
        # every client sends the head), whoever was sampled
        everyone = strategy.allocate(r["round"], range(6)).coverage()
        want = [3 * c / 6 or None for c in everyone] + [3.0]
        assert r["dp_contributors"] == pytest.approx(want)
        assert r["dp_noise_std"][-1] == pytest.approx(0.3 * 0.05 / 3)
        for c in r["clients"]:  # each client clipped on its own side and said whether it had to
            assert c["dp_clip_norm"] == 0.05 and c["unclipped"] in (0, 1)
        assert r["num_rejected"] == 0  # the server found every update within the clip norm
    assert any(c["unclipped"] == 0 for r in records for c in r["clients"])  # clipping bit
    assert summary["epsilon"] == pytest.approx(records[-1]["epsilon"])
    assert summary["rounds_trained"] == 3 and "stopped_by" not in summary
    assert cfg.federation.weighting == "uniform"


def test_a_resumed_dp_run_equals_the_uninterrupted_one(dp_run: Path, tmp_path: Path) -> None:
    crashed = crash_after(dp_run, tmp_path / "crashed", 1)
    assert main(["run", "--resume", str(crashed)]) == 0
    ours, ref = RunDir(crashed).read_metrics(), RunDir(dp_run).read_metrics()
    assert [without_machine(r) for r in ours] == [without_machine(r) for r in ref]
    a = load_file(str(dp_run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_adaptive_clipping_moves_c_and_resumes_exactly(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    ov = _overrides(tiny_bert_dir, tiny_text_csv, privacy__clipping='"adaptive"',
                    privacy__count_noise=1.0, privacy__clip_lr=0.5)  # fmt: skip
    ref = tmp_path / "ref"
    assert _run(ref, ov) == 0
    records = RunDir(ref).read_metrics()
    norms = [r["clip_norm"] for r in records]
    for before, after, r in zip(norms, norms[1:], records, strict=False):
        assert after == pytest.approx(before * math.exp(-0.5 * (r["unclipped_share"] - 0.5)),
                                      rel=1e-6)  # fmt: skip
    assert len(set(norms)) == 3
    # z = 0.3 as accounted; the updates get (z^-2 - (2 x 1.0)^-2)^(-1/2) = 0.30343 (README)
    summary = RunDir(ref).read_summary()
    assert summary["noise_multiplier"] == 0.3
    assert summary["update_noise_multiplier"] == pytest.approx((0.3**-2 - 2.0**-2) ** -0.5)
    assert records[0]["noise_multiplier"] == summary["update_noise_multiplier"]
    crashed = crash_after(ref, tmp_path / "crashed", 2)  # round 3 needs round 2's C
    assert main(["run", "--resume", str(crashed)]) == 0
    assert [without_machine(r) for r in RunDir(crashed).read_metrics()] == [
        without_machine(r) for r in records
    ]


def test_the_budget_stops_the_run_after_its_last_round(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    target = (accountant.epsilon(2, 6, 3, 0.3, 1 / 6) + accountant.epsilon(3, 6, 3, 0.3, 1 / 6)) / 2
    out = tmp_path / "run"
    assert _run(out, _overrides(tiny_bert_dir, tiny_text_csv,
                                privacy__target_epsilon=target)) == 0  # fmt: skip
    run = RunDir(out)
    assert [r["round"] for r in run.read_metrics()] == [1, 2]
    summary = run.read_summary()
    assert summary["stopped_by"] == "privacy.target_epsilon" and summary["rounds_trained"] == 2
    assert summary["epsilon"] <= target
    # a 2-round run: the cosine schedule reaches its floor in round 2, as a 2-round config's
    from fedhello.core.schedule import lr_at

    cfg = load_config(run.config_path)
    assert cfg.federation.rounds == 3 and summary["rounds"] == 2
    t = cfg.train
    want = [lr_at(r, 2, t.lr, t.lr_schedule, t.lr_min_factor) for r in (1, 2)]
    assert [r["lr"] for r in run.read_metrics()] == pytest.approx(want)


def test_clipping_on_the_server_computes_what_clipping_on_the_clients_does(
    dp_run: Path, tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    out = tmp_path / "server"
    assert _run(out, _overrides(tiny_bert_dir, tiny_text_csv, privacy__clip_on='"server"')) == 0
    drop = {"dp_clip_norm", "unclipped"}  # the client's own report of its clipping

    def view(path: Path) -> list:
        recs = [without_machine(r) for r in RunDir(path).read_metrics()]
        for r in recs:
            r["clients"] = [{k: v for k, v in c.items() if k not in drop} for c in r["clients"]]
        return recs

    # the same arithmetic but where the clipping happens: a client's clipped upload is rounded
    # to float32 before the server subtracts, the server's own clipping stays in float64
    assert view(dp_run) == view(out)
    ka = load_file(str(dp_run / "adapter" / "adapter_model.safetensors"))
    kb = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k in ka:
        np.testing.assert_allclose(ka[k], kb[k], rtol=0, atol=1e-6)
    assert all("unclipped" not in c for r in RunDir(out).read_metrics() for c in r["clients"])


def test_without_noise_and_with_a_clip_nobody_reaches_dp_is_uniform_fedavg(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """Where every client trains every layer the expected count is the sampled count: DP
    without noise or clipping is then plain uniform FedAvg (heterogeneous allocations divide
    by expected counts instead: the unit tests above)."""
    dp, plain = tmp_path / "dp", tmp_path / "plain"
    ov = _overrides(tiny_bert_dir, tiny_text_csv, privacy__noise_multiplier=0,
                    privacy__clip_norm=1e6, allocation__strategy='"full"')  # fmt: skip
    assert _run(dp, ov) == 0
    assert _run(plain, [o for o in ov if not o.startswith("privacy.")]
                + ['federation.weighting="uniform"', 'train.head="federated"']) == 0  # fmt: skip
    a = load_file(str(dp / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(plain / "adapter" / "adapter_model.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert RunDir(dp).read_summary()["epsilon"] is None  # infinite: no noise, no privacy


def test_an_unclipped_client_update_is_rejected_by_the_server() -> None:
    cfg = load_config(None, ["privacy.noise_multiplier=1", "privacy.clip_norm=0.1",
                             "clients.num_clients=4", "clients.per_round=2"])  # fmt: skip
    from fedhello.core.aggregation import ClientUpdate

    g = {"l0": np.zeros(4, np.float32), "head": np.zeros(2, np.float32)}
    layer_of = {"l0": 0, "head": None}
    ok = ClientUpdate(0, (0,), 10, {"l0": np.full(4, 0.01, np.float32),
                                    "head": np.zeros(2, np.float32)})  # fmt: skip
    big = ClientUpdate(1, (0,), 10, {"l0": np.full(4, 1.0, np.float32),
                                     "head": np.zeros(2, np.float32)})  # fmt: skip
    plan = AllocationPlan(1, 1, (ClientAllocation(0, 1, (0,)), ClientAllocation(1, 1, (0,))))
    _, rejected, record = PrivateAggregator(cfg).aggregate(g, [ok, big], {0: 1, 1: 1}, plan,
                                                           layer_of, 1)  # fmt: skip
    assert list(rejected) == [1] and rejected[1].startswith("update norm 2 exceeds")
    assert record["dp_contributors"] == [2, 2]  # the planned count still divides


@pytest.mark.slow
def test_flower_simulation_equals_embedded_under_dp_with_the_nodes_clipping(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """The nodes clip before they reply and report their bit over the wire; the server's
    noise and adaptive clip norm follow the same generators: the same run."""
    ov = _overrides(tiny_bert_dir, tiny_text_csv, privacy__clipping='"adaptive"',
                    privacy__count_noise=1.0, federation__rounds=2)  # fmt: skip
    emb, sim = tmp_path / "emb", tmp_path / "sim"
    assert _run(emb, ov) == 0
    assert _run(sim, ov, "--engine", "flower-sim") == 0
    ours = [without_machine(r) for r in RunDir(sim).read_metrics()]
    assert ours == [without_machine(r) for r in RunDir(emb).read_metrics()]
    for r in ours:  # each node clipped to the round's norm (recorded to 8 digits)
        assert all(c["dp_clip_norm"] == pytest.approx(r["clip_norm"]) for c in r["clients"])
    assert len({r["clip_norm"] for r in ours}) == 2  # adaptive: round 2's norm moved
    a = load_file(str(emb / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(sim / "adapter" / "adapter_model.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_plan_shows_the_epsilon_a_configuration_would_spend(tiny_bert_dir: Path) -> None:
    from fedhello.planner import make_plan

    overrides = [
        f'model.name="{tiny_bert_dir}"',
        "clients.num_clients=12",
        "clients.per_round=4",
        "federation.rounds=6",
        "privacy.noise_multiplier=2",
        'allocation.strategy="fedra"',
    ]
    cfg = load_config(None, overrides)
    plan = make_plan(cfg)
    dp = plan["privacy"]
    assert dp["epsilon"] == pytest.approx(accountant.epsilon(6, 12, 4, 2.0, 1 / 12))
    assert [r["epsilon"] for r in plan["rounds"]] == pytest.approx(
        [accountant.epsilon(t, 12, 4, 2.0, 1 / 12) for t in range(1, 7)]
    )
    # per layer, z over its expected contributors (4 x the share of all 12 clients FedRA's
    # draw gives it that round), averaged over the rounds
    from fedhello.core.allocation import build_strategy

    strategy = build_strategy("fedra", 4, plan["budgets"], seed=cfg.run.seed)
    everyone = [strategy.allocate(r, range(12)).coverage() for r in range(1, 7)]
    for layer, value in enumerate(dp["noise_on_mean_per_layer"][:-1]):
        counts = [4 * c[layer] / 12 for c in everyone if c[layer]]
        assert value == pytest.approx(np.mean([2.0 / c for c in counts]), abs=1e-4)
    assert dp["noise_on_mean_per_layer"][-1] == pytest.approx(2.0 / 4)  # the head: everyone


def test_compare_under_dp_pairs_strategies_with_an_epsilon_column(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--strategies", "fedra,deepest-fit", "--seeds", "0,1",
            "--partitions", "iid", "--out", str(out)]  # fmt: skip
    for o in _overrides(tiny_bert_dir, tiny_text_csv, federation__rounds=2):
        args += ["--set", o]
    assert main(args) == 0
    import csv

    rows = {
        r["strategy"]: r for r in csv.DictReader((out / "results.csv").read_text().splitlines())
    }
    eps = accountant.epsilon(2, 6, 3, 0.3, 1 / 6)
    for name in ("fedra", "deepest-fit"):
        assert float(rows[name]["epsilon"]) == pytest.approx(eps)
    # the centralised reference is the ceiling without privacy
    assert rows["centralized"]["epsilon"] == ""
    assert "privacy" not in (out / "runs" / "centralized" / "seed0" / "config.toml").read_text()
    table = (out / "results.md").read_text().splitlines()
    assert table[0].endswith("epsilon (delta) |")
    assert any(line.endswith(f"{eps:.2f} (0.17) seeded |") for line in table)
    assert any(line.startswith("seeded: the noise and the client sample") for line in table)


@pytest.mark.slow
def test_a_loopback_deployment_clips_on_the_nodes_and_equals_embedded(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real SuperLink and SuperNodes: each node clips its update before the reply leaves it
    and records the norm it clipped to; the server's noise follows the run's seed."""
    from flower_harness import deployment, flower_env

    ov = _overrides(tiny_bert_dir, tiny_text_csv, clients__num_clients=3, clients__per_round=2,
                    federation__rounds=2)  # fmt: skip
    emb, dep_out = tmp_path / "emb", tmp_path / "dep"
    assert _run(emb, ov) == 0
    with deployment(tmp_path, nodes=3) as dep:
        for k, v in flower_env(dep.home).items():
            monkeypatch.setenv(k, v)
        assert _run(dep_out, ov, "--engine", "flower", "--superlink", dep.address) == 0
    ours = [without_machine(r) for r in RunDir(dep_out).read_metrics()]
    assert ours == [without_machine(r) for r in RunDir(emb).read_metrics()]
    assert all(c["dp_clip_norm"] == 0.05 and c["unclipped"] in (0, 1)
               for r in ours for c in r["clients"])  # fmt: skip
    assert all(r["num_rejected"] == 0 for r in ours)


def test_the_noise_is_fresh_every_round_and_secret_unless_seeded() -> None:
    """Seeded: the same (seed, round) draws the same noise, another round other noise.
    Secret: every run its own key; the key, kept in the checkpoint's state, gives back the
    same noise on resume."""
    g = {"l0": np.zeros(200, np.float32), "head": np.zeros(3, np.float32)}
    layer_of = {"l0": 0, "head": None}
    plan = AllocationPlan(1, 1, (ClientAllocation(0, 1, (0,)),))

    def noise(cfg_overrides: list[str], round_: int, agg: PrivateAggregator | None = None):
        cfg = load_config(None, ["privacy.noise_multiplier=1", "clients.num_clients=4",
                                 "clients.per_round=2", *cfg_overrides])  # fmt: skip
        agg = agg or PrivateAggregator(cfg)
        return agg.aggregate(g, [], {}, plan, layer_of, round_)[0]["l0"], agg

    seeded = ['privacy.noise="seeded"']
    a1, _ = noise(seeded, 1)
    b1, _ = noise(seeded, 1)
    a2, _ = noise(seeded, 2)
    assert np.array_equal(a1, b1) and not np.array_equal(a1, a2)
    s1, agg = noise([], 1)
    t1, other = noise([], 1)
    assert not np.array_equal(s1, t1) and not np.array_equal(s1, a1)  # a key per run
    assert agg.sampling_seed != other.sampling_seed != 0
    same = ["privacy.noise_multiplier=1", "clients.num_clients=4", "clients.per_round=2"]
    restored = PrivateAggregator(load_config(None, same))
    restored.load_state_dict(agg.state_dict())  # what a checkpoint holds
    assert np.array_equal(noise([], 1, restored)[0], s1)
    assert "noise_key" not in load_config(None, ["privacy.noise_multiplier=1"]).to_toml()


def test_a_secret_keyed_run_resumes_exactly_and_releases_no_key(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    ov = _overrides(tiny_bert_dir, tiny_text_csv, privacy__noise='"secret"')
    ref = tmp_path / "ref"
    assert _run(ref, ov) == 0
    run = RunDir(ref)
    summary = run.read_summary()
    assert summary["noise"] == "secret"
    crashed = crash_after(ref, tmp_path / "crashed", 1)
    assert main(["run", "--resume", str(crashed)]) == 0
    assert [without_machine(r) for r in RunDir(crashed).read_metrics()] == [
        without_machine(r) for r in run.read_metrics()
    ]
    saved = load_file(str(run.checkpoint_dir / "round-000003.safetensors"))
    words = saved["server/privacy/noise_key"].tolist()
    key = sum(int(w) << (32 * i) for i, w in enumerate(words))
    for name in ("config.toml", "metrics.jsonl", "summary.json"):  # never released
        text = (ref / name).read_text()
        assert str(key) not in text and all(str(w) not in text for w in words if w > 10**6)


def test_a_secret_key_is_kept_before_round_1_so_an_early_crash_resumes_with_it(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """Checkpoints every 10 rounds of 3: a run dying in round 2 has only the key's round-0
    checkpoint, and its resume uses that key (without it, a fresh key: other noise and
    sampling for rounds already released)."""
    ov = _overrides(tiny_bert_dir, tiny_text_csv, privacy__noise='"secret"',
                    run__checkpoint_every=10)  # fmt: skip
    ref = tmp_path / "ref"
    assert _run(ref, ov) == 0
    run = RunDir(ref)
    assert (run.checkpoint_dir / "round-000000.safetensors").is_file()
    crashed = crash_after(ref, tmp_path / "crashed", 0)
    assert sorted(p.name for p in RunDir(crashed).checkpoint_dir.glob("round-*")) == [
        "round-000000.json",
        "round-000000.safetensors",
    ]
    assert main(["run", "--resume", str(crashed)]) == 0
    assert [without_machine(r) for r in RunDir(crashed).read_metrics()] == [
        without_machine(r) for r in run.read_metrics()
    ]


def test_a_frozen_head_and_ffa_lora_under_dp_noise_only_what_is_sent(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """FFA-LoRA uploads B alone and a frozen head is not uploaded: neither A nor the head gets
    noise (they stay bit for bit at their initial values); the head has no contributors."""
    out = tmp_path / "run"
    ov = _overrides(tiny_bert_dir, tiny_text_csv, allocation__strategy='"ffa-lora"',
                    train__head='"frozen"', federation__rounds=2)  # fmt: skip
    assert _run(out, ov) == 0
    run = RunDir(out)
    records = run.read_metrics()
    assert all(r["dp_contributors"][-1] is None for r in records)
    first = load_file(str(run.checkpoint_dir / "round-000001.safetensors"))
    last = load_file(str(run.checkpoint_dir / "round-000002.safetensors"))
    a_keys = [k for k in first if "lora_A" in k]
    head = [k for k in first if not k.startswith("server/") and "lora_" not in k]
    assert a_keys and head
    assert all(np.array_equal(first[k], last[k]) for k in a_keys + head)
    assert any(not np.array_equal(first[k], last[k]) for k in first if "lora_B" in k)


# -- settings only adaptive clipping reads; the plan under a budget ------------------------------


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["privacy.target_quantile=0.9"], "config: privacy.target_quantile = 0.9 with "
         "privacy.clipping = 'fixed': only adaptive clipping reads it, so it would be ignored; "
         "allowed: clipping = 'adaptive', or the default (target_quantile = 0.5)"),
        (['privacy.clipping="fixed"', "privacy.clip_lr=0.5"],
         "config: privacy.clip_lr = 0.5 with privacy.clipping = 'fixed'"),
        (["privacy.count_noise=1"], "config: privacy.count_noise = 1 with privacy.clipping = "
         "'fixed': only adaptive clipping reads it, so it would be ignored; allowed: clipping = "
         "'adaptive', or the default (count_noise = unset)"),
        (["privacy.target_quantile=0.9", "privacy.clip_lr=0.5"],
         "config: privacy.target_quantile = 0.9, privacy.clip_lr = 0.5 with privacy.clipping "
         "= 'fixed': only adaptive clipping reads them, so they would be ignored; allowed: "
         "clipping = 'adaptive', or the defaults (target_quantile = 0.5, clip_lr = 0.2)"),
    ],
)  # fmt: skip
def test_adaptive_settings_with_fixed_clipping_are_one_line(
    overrides: list[str], start: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["privacy.noise_multiplier=1", *overrides])
    assert str(err.value).startswith(start)
    assert "\n" not in str(err.value)


def test_adaptive_settings_load_with_adaptive_clipping_or_at_their_defaults(tmp_path: Path) -> None:
    adaptive = ['privacy.clipping="adaptive"', "privacy.target_quantile=0.9",
                "privacy.clip_lr=0.5", "privacy.count_noise=1"]  # fmt: skip
    p = load_config(None, ["privacy.noise_multiplier=1", *adaptive]).privacy
    assert (p.target_quantile, p.clip_lr, p.count_noise) == (0.9, 0.5, 1.0)
    # the defaults written out, as a run's saved config.toml writes them, load under fixed
    spelled = ["privacy.target_quantile=0.5", "privacy.clip_lr=0.2"]
    assert load_config(None, ["privacy.noise_multiplier=1", *spelled]).privacy.clipping == "fixed"
    for extra in ([], adaptive):
        cfg = load_config(None, ["privacy.noise_multiplier=1", "privacy.target_epsilon=5", *extra])
        text = cfg.to_toml()
        assert "target-quantile = " in text and "clip-lr = " in text  # every default spelled out
        path = tmp_path / "config.toml"
        path.write_text(text, encoding="utf-8")
        assert load_config(path) == cfg


def test_the_plan_stops_where_the_budget_stops_the_run(tiny_bert_dir: Path) -> None:
    """A target epsilon between rounds 3 and 4 of 6: the run trains 3 rounds (its loop runs
    ``range(1, last + 1)`` over ``shortened``'s rounds), and the plan shows those 3, with
    their epsilons and the noise of a plain 3-round configuration."""
    from io import StringIO

    from rich.console import Console

    from fedhello.engine.privacy import shortened
    from fedhello.engine.privacy import start as privacy_start
    from fedhello.planner import make_plan, render_plan

    eps = [accountant.epsilon(t, 12, 4, 2.0, 1 / 12) for t in range(0, 7)]
    target = (eps[3] + eps[4]) / 2
    within = max(t for t in range(7) if eps[t] <= target)  # a plain scan: 3
    assert within == 3
    base = [f'model.name="{tiny_bert_dir}"', "clients.num_clients=12", "clients.per_round=4",
            "privacy.noise_multiplier=2", 'allocation.strategy="fedra"']  # fmt: skip
    cfg = load_config(None, [*base, "federation.rounds=6", f"privacy.target_epsilon={target}"])
    _, last = privacy_start(cfg)  # what the run would run
    assert last == within and shortened(cfg, last).federation.rounds == within
    plan = make_plan(cfg)
    assert [r["round"] for r in plan["rounds"]] == list(range(1, within + 1))
    assert [r["round"] for r in make_plan(cfg, rounds=6)["rounds"]] == list(range(1, within + 1))
    assert [r["epsilon"] for r in plan["rounds"]] == pytest.approx(eps[1 : within + 1])
    dp = plan["privacy"]
    assert (dp["rounds_trained"], dp["rounds_configured"]) == (within, 6)
    assert dp["epsilon"] == pytest.approx(eps[within]) and dp["epsilon"] <= target
    # the run the budget makes: a 3-round configuration without a target plans alike
    plain = make_plan(load_config(None, [*base, f"federation.rounds={within}"]))
    assert [r["clients"] for r in plan["rounds"]] == [r["clients"] for r in plain["rounds"]]
    assert plan["coverage"] == plain["coverage"]
    assert dp["noise_on_mean_per_layer"] == plain["privacy"]["noise_on_mean_per_layer"]
    # rounds 4-6 change the averages, so the plan above left them out
    longer = make_plan(load_config(None, [*base, "federation.rounds=6"]))
    assert longer["privacy"]["noise_on_mean_per_layer"] != dp["noise_on_mean_per_layer"]
    shown = StringIO()
    render_plan(plan, Console(file=shown, width=400))
    text = shown.getvalue()
    assert (
        f"after {within} rounds (privacy.target_epsilon stops the run and this plan there, of 6)"
        in text
    )
    assert f"coverage over {within} rounds" in text
