"""Server optimizers and client weighting (``federation.server_optimizer``,
``federation.weighting``): FedOpt's steps against the paper's formulas computed here, tensors
nobody trained left alone (value and moments), FedAvg and FedAvgM(0, 1) the average itself
bit for bit, the weightings' means, older configs and checkpoints, FlexLoRA refused, and a
resumed run with each optimizer equal to the uninterrupted one."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from conftest import crash_after, tiny_overrides
from safetensors.numpy import load_file, save_file

from fedhello.cli import main
from fedhello.core.aggregation import ClientUpdate, aggregate_masked
from fedhello.core.allocation import build_strategy
from fedhello.core.config import load_config, load_saved_config
from fedhello.core.errors import ConfigError
from fedhello.core.numerics import NUMERICS_VERSION
from fedhello.core.server_optimizers import (
    FedAvgM,
    FedOpt,
    build_server_optimizer,
    server_optimizer,
)
from fedhello.store.checkpoint import load_latest, save_checkpoint
from fedhello.store.rerun import without_machine
from fedhello.store.runs import RunDir

SHAPES = {"a": (2, 3), "b": (4,)}
B1, B2, TAU, ETA = 0.9, 0.99, 1e-3, 0.1


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _reference(name: str, x: np.ndarray, targets: list[np.ndarray]) -> np.ndarray:
    """Reddi et al. 2021, Algorithm 2, one tensor, written out: m_0 = 0, v_0 = tau^2."""
    m = np.zeros(x.shape)
    v = np.full(x.shape, TAU**2)
    x64 = x.astype(np.float64)
    for target in targets:  # the round's averaged uploads
        delta = target.astype(np.float64) - x64
        m = B1 * m + (1 - B1) * delta
        if name == "fedadagrad":
            v = v + delta**2
        elif name == "fedadam":
            v = B2 * v + (1 - B2) * delta**2
        else:
            v = v - (1 - B2) * delta**2 * np.sign(v - delta**2)
        x64 = (x64 + ETA * m / (np.sqrt(v) + TAU)).astype(np.float32).astype(np.float64)
    return x64.astype(np.float32)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_one_and_two_steps_follow_the_paper(name: str) -> None:
    opt = build_server_optimizer(name)
    assert isinstance(opt, FedOpt) and (opt.server_lr, opt.beta1, opt.beta2, opt.tau) == (
        ETA, B1, B2, TAU,
    )  # fmt: skip
    x0, avg1, avg2 = _state(0), _state(1), _state(2)
    x1 = opt.step(x0, avg1, set(SHAPES))
    # the second round's average is taken around x1: its delta is avg2 - x1
    x2 = opt.step(x1, avg2, set(SHAPES))
    for k in SHAPES:
        assert x1[k].dtype == x2[k].dtype == np.float32
        np.testing.assert_allclose(x1[k], _reference(name, x0[k], [avg1[k]]), rtol=1e-6)
        np.testing.assert_allclose(x2[k], _reference(name, x0[k], [avg1[k], avg2[k]]), rtol=1e-6)
    # the first step moves every coordinate by about eta (Adam-like sign steps), not to avg
    step1 = np.abs(x1["a"].astype(np.float64) - x0["a"])
    assert np.all(step1 < ETA * 1.01) and not np.allclose(x1["a"], avg1["a"])


@pytest.mark.parametrize(
    "opt",
    [FedOpt("fedadam"), FedOpt("fedyogi"), FedOpt("fedadagrad"), FedAvgM(0.7, 0.5)],
    ids=["fedadam", "fedyogi", "fedadagrad", "fedavgm"],
)
def test_a_tensor_nobody_trained_keeps_its_value_and_moments(opt) -> None:
    x0 = _state(0)
    x1 = opt.step(x0, _state(1), {"a", "b"})
    before = {k: v.copy() for k, v in opt.state_dict().items()}
    avg = {"a": _state(2)["a"], "b": x1["b"]}  # nobody trained "b": its average is its value
    x2 = opt.step(x1, avg, {"a"})
    np.testing.assert_array_equal(x2["b"], x1["b"])
    after = opt.state_dict()
    assert after.keys() == before.keys()
    for key, value in after.items():
        if key.endswith("/b"):
            np.testing.assert_array_equal(value, before[key])  # not decayed
        else:
            assert not np.array_equal(value, before[key]), key


class _OldServerMomentum:
    """fedhello's FedAvgM before the server optimizers (as it was), the reference."""

    def __init__(self, beta: float, server_lr: float) -> None:
        self.beta, self.server_lr = beta, server_lr
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, old: Mapping[str, np.ndarray], averaged: dict, updated: set[str]) -> dict:
        if self.beta == 0.0 and self.server_lr == 1.0:
            return averaged
        out = dict(averaged)
        for key in updated:
            delta = averaged[key] - old[key]
            v = self.velocity.get(key)
            v = delta if v is None else self.beta * v + delta
            self.velocity[key] = v
            out[key] = (old[key] + self.server_lr * v).astype(old[key].dtype)
        return out


L = 3
LAYER_OF: dict[str, int | None] = {
    f"enc.layer.{i}.q.lora_{ab}.weight": i for i in range(L) for ab in "AB"
} | {"classifier.modules_to_save.weight": None}


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(2, 3)).astype(np.float32) for k in LAYER_OF}


def _update(client: int, layers: tuple[int, ...], n: int, seen: int, seed: int) -> ClientUpdate:
    rng = np.random.default_rng(seed)
    tensors = {
        k: rng.normal(size=(2, 3)).astype(np.float32)
        for k, layer in LAYER_OF.items()
        if layer is None or layer in layers
    }
    return ClientUpdate(client, layers, n, tensors, examples_seen=seen)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm"])
def test_fedavg_and_fedavgm_without_momentum_are_the_average_bit_for_bit(name: str) -> None:
    g = _global()
    ups = [_update(0, (0, 1), 10, 16, 1), _update(1, (1, 2), 30, 16, 2)]
    averaged, _ = aggregate_masked(g, ups, LAYER_OF, L)
    opt = build_server_optimizer(name, None, 0.0)
    out = opt.step(g, averaged, {k for u in ups for k in u.tensors})
    assert out.keys() == averaged.keys()
    for k in averaged:
        assert out[k].dtype == averaged[k].dtype and out[k].tobytes() == averaged[k].tobytes()
    assert opt.state_dict() == {}
    # and the default config is exactly that optimizer
    default = server_optimizer(load_config().federation)
    assert isinstance(default, FedAvgM) and (default.beta, default.server_lr) == (0.0, 1.0)


def test_fedavgm_keeps_its_arithmetic_bit_for_bit() -> None:
    new, old = FedAvgM(0.7, 0.5), _OldServerMomentum(0.5, 0.7)
    x_new = x_old = _global(0)
    for r in range(1, 4):
        avg = _global(r)
        updated = set(list(LAYER_OF)[: 2 + 2 * r])
        x_new = new.step(x_new, {**x_new, **{k: avg[k] for k in updated}}, updated)
        x_old = old.step(x_old, {**x_old, **{k: avg[k] for k in updated}}, updated)
        for k in LAYER_OF:
            assert x_new[k].tobytes() == x_old[k].tobytes(), (r, k)


@pytest.mark.parametrize(
    "weighting,weights",
    [("shard", (10, 30, 5)), ("uniform", (1, 1, 1)), ("examples-seen", (64, 16, 32))],
)
def test_weightings_against_hand_computed_means(weighting: str, weights: tuple) -> None:
    g = _global()
    ups = [_update(0, (0, 1), 10, 64, 1), _update(1, (1, 2), 30, 16, 2),
           _update(2, (1,), 5, 32, 3)]  # fmt: skip
    w = dict(enumerate(weights))
    strategy = build_strategy("fedra", num_layers=L, budgets=[2] * 3)
    for new, _ in (
        aggregate_masked(g, ups, LAYER_OF, L, weighting),  # type: ignore[arg-type]
        strategy.aggregate(g, ups, LAYER_OF, weighting)[:2],  # type: ignore[arg-type]
    ):
        a0, a1, a2 = (f"enc.layer.{i}.q.lora_A.weight" for i in range(L))
        t = [u.tensors for u in ups]
        np.testing.assert_allclose(new[a0], t[0][a0], rtol=1e-6)  # one holder
        np.testing.assert_allclose(
            new[a1], (w[0] * t[0][a1] + w[1] * t[1][a1] + w[2] * t[2][a1]) / sum(weights),
            rtol=1e-6,
        )  # fmt: skip
        np.testing.assert_allclose(new[a2], t[1][a2], rtol=1e-6)
        head = "classifier.modules_to_save.weight"
        np.testing.assert_allclose(
            new[head], sum(w[i] * t[i][head] for i in range(3)) / sum(weights), rtol=1e-6
        )


def test_examples_seen_weighting_rejects_an_update_without_a_count() -> None:
    g = _global()
    ups = [_update(0, (0,), 10, 0, 1), _update(1, (0,), 10, 8, 2)]
    new, report = aggregate_masked(g, ups, LAYER_OF, L, "examples-seen")
    assert report.accepted == [1] and "examples_seen = 0" in report.rejected[0]
    np.testing.assert_array_equal(
        new["enc.layer.0.q.lora_A.weight"], ups[1].tensors["enc.layer.0.q.lora_A.weight"]
    )
    _, report = aggregate_masked(g, ups, LAYER_OF, L, "shard")  # not needed there
    assert report.accepted == [0, 1]


# ---- configs -------------------------------------------------------------------------------


def test_older_keys_load_to_the_new_ones(tmp_path: Path) -> None:
    f = load_config(None, ["federation.weighted=true"]).federation
    assert (f.weighting, f.server_optimizer, f.server_lr) == ("shard", "fedavg", 1.0)
    assert load_config(None, ["federation.weighted=false"]).federation.weighting == "uniform"
    f = load_config(None, ["federation.server_momentum=0.5", "federation.server_lr=0.7"]).federation
    assert (f.server_optimizer, f.server_momentum, f.server_lr) == ("fedavgm", 0.5, 0.7)
    # a run's config.toml written before the keys existed, read as it was written
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    (run / "config.toml").write_text(
        "[federation]\nrounds = 3\nweighted = false\nserver-momentum = 0.9\nserver-lr = 1.0\n"
    )
    for cfg in (load_config(run / "config.toml"), load_saved_config(run / "config.toml")):
        f = cfg.federation
        assert (f.weighting, f.server_optimizer, f.server_momentum) == ("uniform", "fedavgm", 0.9)
    # the resolved config names the new keys only, and reads back to itself
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert "weighted" not in path.read_text() and load_config(path) == cfg
    # the paper presets keep their unweighted averaging
    root = Path(__file__).resolve().parents[1]
    assert load_config(root / "configs/paper/sst2.toml").federation.weighting == "uniform"


def test_optimizer_defaults() -> None:
    f = load_config(None, ["federation.server_optimizer=fedadam"]).federation
    assert (f.server_lr, f.server_beta1, f.server_beta2, f.server_tau) == (0.1, 0.9, 0.99, 1e-3)
    f = load_config(None, ["federation.server_optimizer=fedyogi", "federation.server_lr=0.01"])
    assert f.federation.server_lr == 0.01
    assert load_config(None, ["federation.server_optimizer=fedavgm"]).federation.server_lr == 1.0


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["federation.weighted=true", "federation.weighting=uniform"],
         ["federation.weighted = true", "federation.weighting = 'uniform'", "examples-seen"]),
        (["federation.weighting=examples"], ["federation.weighting", "'examples'", "shard"]),
        (["federation.server_momentum=0.5", "federation.server_optimizer=fedadam"],
         ["federation.server_momentum = 0.5", "'fedadam'", "fedavgm"]),
        (["federation.server_momentum=0.5", "federation.server_optimizer=fedavg"],
         ["federation.server_momentum = 0.5", "'fedavg'", "fedavgm"]),
        (["federation.server_optimizer=sgd"], ["federation.server_optimizer", "'sgd'", "fedyogi"]),
        (["federation.server_beta1=0.5"],  # FedOpt's settings under fedavg: refused, not ignored
         ["federation.server_beta1 = 0.5", "'fedavg'", "fedadam or fedyogi or fedadagrad"]),
        (["federation.server_optimizer=fedadagrad", "federation.server_beta2=0.5"],
         ["federation.server_beta2 = 0.5", "'fedadagrad'", "fedadam or fedyogi", "its default"]),
        (["federation.server_optimizer=fedavgm", "federation.server_momentum=0.5",
          "federation.server_tau=0.01", "federation.server_beta2=0.5"],
         ["server_beta2 = 0.5, federation.server_tau = 0.01", "'fedavgm'", "their defaults"]),
        (["allocation.strategy=flexlora", "federation.server_optimizer=fedadam"],
         ["federation.server_optimizer = 'fedadam'", "flexlora", "allowed", "fedavg"]),
        (["allocation.strategy=flexlora", "federation.server_momentum=0.5"],
         ["federation.server_optimizer = 'fedavgm'", "flexlora", "allowed"]),
        (["allocation.strategy=flexlora", "federation.server_lr=0.5"],
         ["federation.server_lr = 0.5", "flexlora", "allowed"]),
    ],
)  # fmt: skip
def test_meaningless_combinations_are_one_line_errors(overrides: list[str], words: list[str]):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_fedopt_settings_load_where_read_and_as_saved_defaults(tmp_path: Path) -> None:
    read = ["federation.server_optimizer=fedadagrad", "federation.server_tau=0.01",
            "federation.server_beta1=0.5"]  # fmt: skip
    cfg = load_config(None, read)
    assert (cfg.federation.server_tau, cfg.federation.server_beta1) == (0.01, 0.5)
    yogi = load_config(None, ["federation.server_optimizer=fedyogi", "federation.server_beta2=0.9"])
    assert yogi.federation.server_beta2 == 0.9
    saved = tmp_path / "config.toml"  # a run's config.toml writes every default out
    saved.write_text(load_config(None, []).to_toml())
    assert "server_beta2" in saved.read_text().replace("-", "_")
    assert load_saved_config(saved).federation.server_optimizer == "fedavg"


def test_flexlora_with_plain_fedavg_is_fine() -> None:
    cfg = load_config(None, ["allocation.strategy=flexlora", "federation.weighting=uniform"])
    assert cfg.federation.server_optimizer == "fedavg"


# ---- checkpoints and resume ----------------------------------------------------------------


def test_an_old_checkpoint_s_velocity_loads_into_fedavgm(tmp_path: Path) -> None:
    """A checkpoint written before the server optimizers (``momentum/<tensor>``)."""
    import hashlib

    x1, v = _state(1), _state(2)
    tensors = x1 | {f"momentum/{k}": a for k, a in v.items()}
    save_file(tensors, str(tmp_path / "round-000001.safetensors"))
    digest = hashlib.sha256((tmp_path / "round-000001.safetensors").read_bytes()).hexdigest()
    (tmp_path / "round-000001.json").write_text(json.dumps({
        "format": "fedhello-checkpoint-1", "round": 1, "config_sha256": "h",
        "tensors_sha256": digest, "keys": sorted(x1), "strategy_state": {},
        "numerics_version": NUMERICS_VERSION,
    }))  # fmt: skip
    ck = load_latest(tmp_path, "h", set(SHAPES))
    assert ck is not None and ck.state.keys() == set(SHAPES)
    opt = FedAvgM(1.0, 0.5)
    opt.load_state_dict(ck.optimizer_state)
    for k in SHAPES:
        np.testing.assert_array_equal(opt.velocity[k], v[k])
    with pytest.raises(ValueError, match="another optimizer"):
        FedOpt("fedadam").load_state_dict(ck.optimizer_state)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_the_optimizer_state_survives_a_checkpoint(name: str, tmp_path: Path) -> None:
    def make():
        return build_server_optimizer(name, None, 0.5 if name == "fedavgm" else 0.0)

    whole, first = make(), make()
    x = whole.step(_state(0), _state(1), set(SHAPES))
    y = first.step(_state(0), _state(1), set(SHAPES))
    save_checkpoint(tmp_path, 1, y, first.state_dict(), {}, "h")
    ck = load_latest(tmp_path, "h", set(SHAPES))
    assert ck is not None
    resumed = make()
    resumed.load_state_dict(ck.optimizer_state)
    x = whole.step(x, _state(2), {"a"})
    y = resumed.step(ck.state, _state(2), {"a"})
    for k in SHAPES:
        assert x[k].tobytes() == y[k].tobytes()


def _overrides(model: Path, data: Path, **extra: object) -> list[str]:
    return tiny_overrides(
        model, data, data__text_column='"sentence"', data__label_column='"topic"',
        federation__rounds=3, run__keep_checkpoints=3, **extra,
    )  # fmt: skip


@pytest.mark.parametrize(
    "settings",
    [
        {"federation__server_optimizer": '"fedavgm"', "federation__server_momentum": 0.5},
        {"federation__server_optimizer": '"fedadam"', "federation__weighting": '"examples-seen"',
         "train__local_epochs": 0.3},
        {"federation__server_optimizer": '"fedyogi"', "federation__weighting": '"uniform"'},
        {"federation__server_optimizer": '"fedadagrad"', "federation__server_lr": 0.05},
    ],
    ids=["fedavgm", "fedadam-examples-seen", "fedyogi-uniform", "fedadagrad"],
)  # fmt: skip
def test_a_resumed_run_equals_the_uninterrupted_one(
    settings: dict, tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """Stopped after round 1's checkpoint (rounds 2 and 3 to recompute, moments needed)."""
    ref = tmp_path / "ref"
    args = [a for o in _overrides(tiny_bert_dir, tiny_text_csv, **settings) for a in ("--set", o)]
    assert main(["run", "--out", str(ref), *args]) == 0
    crashed = crash_after(ref, tmp_path / "crashed", 1)
    run = RunDir(crashed)
    saved = load_file(str(run.checkpoint_dir / "round-000001.safetensors"))
    assert any(k.startswith("server/") for k in saved)  # the optimizer's state is in it
    assert main(["run", "--resume", str(crashed)]) == 0

    ref_metrics = [without_machine(r) for r in RunDir(ref).read_metrics()]
    assert [without_machine(r) for r in run.read_metrics()] == ref_metrics
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert run.read_summary()["resumed_at_round"] == 2
    if "examples-seen" in str(settings):  # the weights were the work done, not all equal
        seen = {c["examples_seen"] for r in ref_metrics for c in r["clients"]}
        assert len(seen) > 1 and all(s % 8 == 0 for s in seen)
