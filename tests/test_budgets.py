"""Budgets in real units: allowances, the fit policy, cost-aware strategies (pure python), and
on a tiny model: the profile is measured, stored and reused, and no client ever exceeds its
memory limit unless the fit is off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides

from fedhello.core.allocation import build_strategy, strategy_class, strategy_names
from fedhello.core.errors import ConfigError, UserError
from fedhello.core.fit import (
    MEMORY_TOLERANCE,
    ResourceLimit,
    allowance,
    apply_fit,
    repair,
)
from fedhello.core.layers import AllocationPlan, ClientAllocation
from fedhello.core.profile import Cost, CostProfile
from fedhello.store.rerun import without_machine

L = 4

# Limits in real units are for layer strategies (a rank method's budget is a rank: config error)
# and for clients that train A and B (FFA-LoRA's profile would differ: a config error too)
LAYER_STRATEGIES = [
    n
    for n in strategy_names()
    if not (strategy_class(n).rank_method or strategy_class(n).freezes_a)
]


def synthetic_profile() -> CostProfile:
    """memory = 10 MB per block of depth + 1 MB per layer; time = 1 s + 0.1 s per block."""
    table = {
        (b, n): Cost(10.0 * (L - b) + n, 1.0 + 0.1 * (L - b))
        for b in range(L)
        for n in range(1, L - b + 1)
    }
    return CostProfile({"test": True}, L, table, [1000] * L, 500)


def test_allowance_is_the_top_count_and_the_lowest_block_where_it_fits() -> None:
    p = synthetic_profile()
    # 21 MB: the top block (11) fits, two layers (22) do not; block 2 alone costs 21: floor 2
    assert allowance(ResourceLimit(memory_mb=21), p, "x").count == 1
    assert allowance(ResourceLimit(memory_mb=21), p, "x").floor == 2
    # 33 MB: the top 3 layers (from block 1: 33) fit; floor 1
    assert (allowance(ResourceLimit(memory_mb=33), p, "x").count,) == (3,)
    assert allowance(ResourceLimit(memory_mb=33), p, "x").floor == 1
    assert allowance(ResourceLimit(memory_mb=1000), p, "x").count == L
    # an upload limit caps the count (head 500 B + 1000 B per layer)
    two_layers = ResourceLimit(memory_mb=1000, upload_mb=2500 / 2**20)
    assert allowance(two_layers, p, "x").count == 2 and allowance(two_layers, p, "x").floor == 0


def test_a_limit_that_fits_no_layer_names_who_and_the_smallest_limit() -> None:
    with pytest.raises(
        ConfigError, match=r"clients.tiers\[0\].*10 MB.*the top layer alone needs 11 MB of train"
    ):
        allowance(ResourceLimit(memory_mb=10), synthetic_profile(), "clients.tiers[0]")


def test_repair_moves_the_shallowest_layers_up_and_drops_only_when_it_must() -> None:
    p = synthetic_profile()
    # 22.5 MB affords two layers from block 2: 0 moves to the deepest free block (3)
    assert repair([0, 2], ResourceLimit(memory_mb=22.5), p) == (2, 3)
    # only the top block alone fits: nothing free above block 0, so drop, drop, drop
    assert repair([0, 1, 2, 3], ResourceLimit(memory_mb=11.5), p) == (3,)
    # an upload depends on the count only: moving cannot help, the shallowest is dropped
    assert repair([0, 1, 2], ResourceLimit(upload_mb=2500 / 2**20), p) == (1, 2)
    # a set that fits is left alone
    assert repair([3], ResourceLimit(memory_mb=11.5), p) == (3,)


def test_fit_policies() -> None:
    p = synthetic_profile()
    plan = AllocationPlan(
        3, L, (ClientAllocation(0, 4, (0, 1, 2, 3)), ClientAllocation(1, 1, (0,)))
    )
    limits = [None, ResourceLimit(memory_mb=21)]
    fixed = apply_fit(plan, limits, [p, p], "repair")
    assert fixed.clients[0] == plan.clients[0]
    # block 0 moves to the deepest free block
    assert fixed.clients[1].layers == (3,) and fixed.clients[1].repaired_from == (0,)
    assert fixed.clients[1].as_dict()["repaired_from"] == [0]
    assert apply_fit(plan, limits, [p, p], "repair") == fixed  # no draw: the same every time
    assert apply_fit(plan, limits, [p, p], "off") is plan
    with pytest.raises(UserError, match=r"round 3, client 1: layers \[0\] need 41.0 MB .* > 21 MB"):
        apply_fit(plan, limits, [p, p], "strict")


def test_every_clients_plan_is_repaired_quietly_even_under_strict(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DP's expected counts read what every client would train if sampled: a client outside
    the round's sample is not refused (strict refuses it when it is sampled), and a hundred
    clients' repairs a round are not logged at info."""
    import logging

    from fedhello.engine.resources import Resources

    p = synthetic_profile()
    plan = AllocationPlan(
        3, L, (ClientAllocation(0, 4, (0, 1, 2, 3)), ClientAllocation(1, 1, (0,)))
    )
    limits = [None, ResourceLimit(memory_mb=21)]
    want = apply_fit(plan, limits, [p, p], "repair")
    for policy in ("strict", "repair"):
        res = Resources(limits, [p, p], policy)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fedhello"):
            everyone = res.fit_everyone(plan)
        assert not [r for r in caplog.records if r.levelno >= logging.INFO]
        assert everyone == want
    assert Resources(limits, [p, p], "off").fit_everyone(plan) is plan


@pytest.mark.parametrize("name", LAYER_STRATEGIES)
def test_cost_aware_strategies_choose_within_each_clients_floor(name: str) -> None:
    s = build_strategy(name, 6, [6, 6, 6], seed=1)
    s.set_budget(0, 2, floor=3)  # two layers among blocks 3..5
    s.set_budget(1, 2, floor=4)  # the window holds exactly two: forced
    for r in range(1, 6):
        plan = s.allocate(r, [0, 1, 2])
        if name != "full":  # full ignores budgets (the fit policy repairs it)
            assert all(x >= 3 for x in plan.layers_of(0)), plan
            assert plan.layers_of(1) in ((4, 5), ()), plan
        if name not in ("full", "exclusive", "straggler"):
            assert len(plan.layers_of(0)) == 2
        cover = s.expected_coverage(r, [0, 1, 2])
        if cover is not None:
            assert cover[:3] == pytest.approx([1.0, 1.0, 1.0])  # client 2 only, full budget
    deepest = build_strategy("deepest-fit", 6, [2, 4, 6])
    assert [list(a.layers) for a in deepest.allocate(1, [0, 1, 2]).clients] == [
        [4, 5], [2, 3, 4, 5], [0, 1, 2, 3, 4, 5],
    ]  # fmt: skip


# ---- on a tiny model ------------------------------------------------------------------------


def _overrides(bert: Path, csv: Path, **extra: object) -> list[str]:
    # max_length 6 = [CLS] + four one-piece words + [SEP]: every batch has the full width the
    # probe measures, so measured and predicted training memory agree
    return tiny_overrides(bert, csv, data__text_column='"sentence"', data__label_column='"topic"',
                          model__max_length=6, train__precision='"fp32"', **extra)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_profile(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_text_csv: Path
) -> tuple[dict, Path]:
    import fedhello

    profiles = tmp_path_factory.mktemp("profiles")
    cfg = fedhello.load_config(None, _overrides(tiny_bert_dir, tiny_text_csv,
                                                run__profile_dir=f'"{profiles}"'))  # fmt: skip
    result = fedhello.calibrate(cfg)
    assert result["source"] == "measured"
    return result, profiles


def _memory(result: dict, lowest: int, count: int) -> float:
    entry = next(e for e in result["profile"]["entries"]
                 if (e["lowest"], e["count"]) == (lowest, count))  # fmt: skip
    return float(entry["memory_mb"])


def test_the_profile_is_stored_reused_and_remeasured_when_its_key_changes(
    tiny_profile: tuple[dict, Path], tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    import fedhello

    first, profiles = tiny_profile
    assert len(first["profile"]["entries"]) == 4 + 3 + 2 + 1  # every (lowest block, count)
    # deeper sets cost less: backward stops at the lowest trained block
    assert _memory(first, 0, 1) > _memory(first, 1, 1) > _memory(first, 2, 1) > _memory(first, 3, 1)
    ov = _overrides(tiny_bert_dir, tiny_text_csv, run__profile_dir=f'"{profiles}"')
    again = fedhello.calibrate(fedhello.load_config(None, ov))
    assert again["source"] == "reused" and again["profile"] == first["profile"]
    bigger = fedhello.calibrate(fedhello.load_config(None, [*ov, "train.batch_size=16"]))
    assert bigger["source"] == "measured" and bigger["path"] != first["path"]
    assert _memory(bigger, 0, 4) > _memory(first, 0, 4)
    # a file whose key is not the wanted one (edited, older) is measured again, not reused
    path = Path(first["path"])
    data = json.loads(path.read_text())
    data["key"]["batch_size"] = 999
    path.write_text(json.dumps(data))
    assert fedhello.calibrate(fedhello.load_config(None, ov))["source"] == "measured"
    assert json.loads(path.read_text())["key"]["batch_size"] == 8


def _memory_run(tmp: Path, bert: Path, csv: Path, profiles: Path, limits: list[float],
                strategy: str, fit: str = "auto", name: str = "") -> list[dict]:  # fmt: skip
    import fedhello
    from fedhello.store.runs import RunDir

    ov = _overrides(bert, csv, run__profile_dir=f'"{profiles}"', clients__budget_kind='"memory-mb"',
                    clients__tiers=str(limits), allocation__strategy=f'"{strategy}"',
                    allocation__fit=f'"{fit}"', federation__rounds=3, clients__per_round=4,
                    allocation__fisher_warmup=1, allocation__fisher_every=1)  # fmt: skip
    out = tmp / (name or f"{strategy}-{fit}")
    fedhello.run(fedhello.load_config(None, ov), out)
    assert (out / "profile.json").is_file()
    return RunDir(out).read_metrics()


def _limits(result: dict) -> list[float]:
    # weak: the top block alone (block 0 far out of reach); mid: two layers from block 2; strong:
    # everything
    return [
        _memory(result, 3, 1) * 1.02,
        _memory(result, 2, 2) * 1.02,
        _memory(result, 0, 4) * 1.02,
    ]


@pytest.mark.parametrize("strategy", LAYER_STRATEGIES)
def test_no_client_exceeds_its_memory_limit(
    strategy: str, tmp_path: Path, tiny_profile: tuple[dict, Path], tiny_bert_dir: Path,
    tiny_text_csv: Path,
) -> None:  # fmt: skip
    result, profiles = tiny_profile
    records = _memory_run(tmp_path, tiny_bert_dir, tiny_text_csv, profiles, _limits(result),
                          strategy)  # fmt: skip
    clients = [c for r in records for c in r["clients"]]
    assert clients and all(c["memory_limit_mb"] is not None for c in clients)
    for c in clients:
        if c["layers"]:
            assert c["train_memory_mb"] <= c["memory_limit_mb"] * (1 + MEMORY_TOLERANCE), c
            predicted = _memory(result, min(c["layers"]), len(c["layers"]))
            assert c["train_memory_mb"] == pytest.approx(predicted, rel=MEMORY_TOLERANCE)
    repairs = sum(r["num_repairs"] for r in records)
    # the cost-aware strategies choose within each floor; full ignores budgets and is repaired
    assert (repairs > 0) == (strategy == "full")
    assert sum(1 for c in clients if "repaired_from" in c) == repairs


def test_with_fit_off_the_same_limits_are_exceeded(
    tmp_path: Path, tiny_profile: tuple[dict, Path], tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    result, profiles = tiny_profile
    for strategy in ("fedra", "full"):
        records = _memory_run(tmp_path, tiny_bert_dir, tiny_text_csv, profiles,
                              _limits(result), strategy, fit="off")  # fmt: skip
        clients = [c for r in records for c in r["clients"]]
        over = [
            c
            for c in clients
            if c["train_memory_mb"] > c["memory_limit_mb"] * (1 + MEMORY_TOLERANCE)
        ]
        assert over, f"{strategy}: no client exceeded its limit without the fit"
        assert all(r["num_repairs"] == 0 for r in records)


def test_repairs_are_deterministic(
    tmp_path: Path, tiny_profile: tuple[dict, Path], tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    result, profiles = tiny_profile
    runs = [_memory_run(tmp_path, tiny_bert_dir, tiny_text_csv, profiles, _limits(result), "full",
                        name=f"full-{i}") for i in range(2)]  # fmt: skip
    assert sum(r["num_repairs"] for r in runs[0]) > 0
    assert without_machine(runs[0]) == without_machine(runs[1])
    fedra = _memory_run(tmp_path, tiny_bert_dir, tiny_text_csv, profiles, _limits(result), "fedra")
    assert [r["sampled"] for r in fedra] == [r["sampled"] for r in runs[0]]  # still paired


def test_layer_budgets_record_no_limits(text_run: Path) -> None:
    from fedhello.store.runs import RunDir

    records = RunDir(text_run).read_metrics()
    assert not (text_run / "profile.json").exists()
    assert all("num_repairs" not in r for r in records)
    for c in (c for r in records for c in r["clients"]):
        assert "memory_limit_mb" not in c and "repaired_from" not in c and c["step_seconds"] > 0


def test_cli_calibrate_and_a_limit_too_small(
    tiny_profile: tuple[dict, Path], tiny_bert_dir: Path, tiny_text_csv: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from fedhello.cli import main

    result, profiles = tiny_profile
    ov = _overrides(tiny_bert_dir, tiny_text_csv, run__profile_dir=f'"{profiles}"',
                    clients__budget_kind='"memory-mb"',
                    clients__tiers=str(_limits(result)))  # fmt: skip
    args = [x for o in ov for x in ("--set", o)]
    assert main(["calibrate", *args]) == 0
    out = capsys.readouterr().out
    assert "lowest trained block" in out and "tier 0" in out and "from block 3 up" in out
    small = _memory(result, 3, 1) / 2
    rc = main(
        ["run", "--out", str(tmp_path / "r"), *args, "--set", f"clients.tiers=[{small}, 100]"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "clients.tiers[0] (client 0)" in err[0] and "the top layer alone needs" in err[0]
    assert not (tmp_path / "r").exists()


def test_compare_reports_memory_against_limits(
    tmp_path: Path, tiny_profile: tuple[dict, Path], tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    import fedhello

    result, profiles = tiny_profile
    ov = _overrides(tiny_bert_dir, tiny_text_csv, run__profile_dir=f'"{profiles}"',
                    clients__budget_kind='"memory-mb"',
                    clients__tiers=str(_limits(result)))  # fmt: skip
    out = fedhello.compare(fedhello.load_config(None, ov), "deepest-fit,full", [0], "iid",
                           tmp_path / "cmp")  # fmt: skip
    text = (tmp_path / "cmp" / "results.md").read_text()
    assert "largest train MB / limit, by tier" in text
    rows = {r["strategy"]: r for r in out["table"]}
    limits = _limits(result)
    assert rows["full"]["repairs"] > 0 and rows["deepest-fit"]["repairs"] == 0
    for r in (rows["full"], rows["deepest-fit"]):
        assert r["limit_mb_by_tier"] == {t: pytest.approx(v) for t, v in enumerate(limits)}
        for t, mb in r["train_mb_max_by_tier"].items():
            assert mb <= limits[t] * (1 + MEMORY_TOLERANCE)
    assert (tmp_path / "cmp" / "plots" / "accuracy-vs-resources-iid.png").is_file()


def test_plan_shows_the_sets_within_the_limits(
    tiny_profile: tuple[dict, Path], tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    import fedhello

    result, profiles = tiny_profile
    ov = _overrides(tiny_bert_dir, tiny_text_csv, run__profile_dir=f'"{profiles}"',
                    clients__budget_kind='"memory-mb"', allocation__strategy='"fedra"',
                    clients__tiers=str(_limits(result)))  # fmt: skip
    plan = fedhello.plan(fedhello.load_config(None, ov), rounds=4)
    for entry in plan["rounds"]:
        for c in entry["clients"]:
            tier = c["client"] * 3 // 6
            assert c["layers"] == [[3], [2, 3], [0, 1, 2, 3]][tier], c


def test_a_limit_is_named_by_the_keys_that_set_it() -> None:
    """An upload limit under layer budgets is ``clients.upload_mb``'s, not the tier's budget."""
    from fedhello.core.budgets import limit_source
    from fedhello.core.config import load_config

    upload = load_config(None, ["clients.upload_mb=[0.1, 0.2, 0.3]"])
    assert limit_source(upload, 0) == "clients.upload_mb[0] (client 0)"
    both = load_config(None, ['clients.budget_kind="memory-mb"', "clients.tiers=[100.0, 200.0]",
                              "clients.upload_mb=[0.1, 0.2]"])  # fmt: skip
    assert limit_source(both, 11) == "clients.tiers[1] and clients.upload_mb[1] (client 11)"


def test_a_memory_limit_with_checkpointing_on_a_cpu_is_refused(
    tiny_profile: tuple[dict, Path], tiny_bert_dir: Path, tiny_text_csv: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The CPU's meter cannot see the block gradient checkpointing rebuilds in backward: a
    memory limit there would not hold, so the run is refused in one line before anything."""
    from fedhello.cli import main

    result, profiles = tiny_profile
    ov = _overrides(tiny_bert_dir, tiny_text_csv, run__profile_dir=f'"{profiles}"',
                    clients__budget_kind='"memory-mb"', clients__tiers=str(_limits(result)),
                    train__gradient_checkpointing="true")  # fmt: skip
    args = [x for o in ov for x in ("--set", o)]
    assert main(["run", "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.gradient_checkpointing = true on a CPU" in err[0], err
    assert not (tmp_path / "r").exists()


def test_per_client_budgets_take_the_upload_limit_of_the_tier_the_run_records() -> None:
    """With clients.budgets a client's tier is its value's rank (as metrics.jsonl records
    it), and its upload limit is that tier's, not that of its place in client order."""
    from fedhello.core.budgets import client_limits, client_tiers
    from fedhello.core.config import load_config

    cfg = load_config(None, ['clients.budget_kind="memory-mb"', "clients.num_clients=4",
                             "clients.per_round=2", "clients.tiers=[100.0, 200.0]",
                             "clients.budgets=[200, 100, 200, 100]",
                             "clients.upload_mb=[0.3, 0.6]"])  # fmt: skip
    assert client_tiers(4, 2, cfg.clients.budgets) == [1, 0, 1, 0]
    assert [lim.upload_mb for lim in client_limits(cfg) if lim] == [0.6, 0.3, 0.6, 0.3]
    layers = load_config(
        None,
        [
            "clients.num_clients=4",
            "clients.per_round=2",
            "clients.budgets=[2, 2, 4, 4]",
            "clients.upload_mb=[1.0, 2.0]",
        ],
    )
    assert [lim.upload_mb for lim in client_limits(layers) if lim] == [1.0, 1.0, 2.0, 2.0]
    with pytest.raises(ConfigError, match=r"clients.budgets of 3 distinct values"):
        load_config(
            None,
            [
                'clients.budget_kind="memory-mb"',
                "clients.num_clients=3",
                "clients.per_round=2",
                "clients.tiers=[100.0, 200.0]",
                "clients.budgets=[100, 200, 300]",
                "clients.upload_mb=[0.3, 0.6]",
            ],
        )
