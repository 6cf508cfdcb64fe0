"""Paired comparisons: same partitions and clients, reuse of finished runs, honest tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides
from scipy import stats

from fedhello.cli import main
from fedhello.core.config import Config
from fedhello.core.errors import ConfigError
from fedhello.store.runs import RunDir
from fedhello.studies.request import ALL_STRATEGIES, parse_strategies

STRATEGIES = ["fedra", "geometric:triangle"]


def _args(out: Path, model: Path, data: Path) -> list[str]:
    ov = tiny_overrides(model, data, data__text_column='"sentence"', data__label_column='"topic"',
                        federation__rounds=3)  # fmt: skip
    args = ["compare", "--strategies", ",".join(STRATEGIES), "--seeds", "0,1",
            "--partitions", "dirichlet,iid", "--out", str(out)]  # fmt: skip
    for o in ov:
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def compare_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_text_csv: Path
) -> Path:
    out = tmp_path_factory.mktemp("cmp") / "c"
    assert main(_args(out, tiny_bert_dir, tiny_text_csv)) == 0
    return out


def _run(root: Path, partition: str, strategy: str, seed: int) -> RunDir:
    return RunDir(root / "runs" / partition / strategy.replace(":", "-") / f"seed{seed}")


def test_strategies_see_the_same_partitions_and_clients(compare_dir: Path) -> None:
    for partition in ("dirichlet", "iid"):
        for seed in (0, 1):
            a, b = (_run(compare_dir, partition, s, seed).read_metrics() for s in STRATEGIES)
            assert [r["sampled"] for r in a] == [r["sampled"] for r in b]
            sizes_a = {c["client"]: c["num_examples"] for r in a for c in r["clients"]}
            sizes_b = {c["client"]: c["num_examples"] for r in b for c in r["clients"]}
            common = sizes_a.keys() & sizes_b.keys()
            assert common and all(sizes_a[c] == sizes_b[c] for c in common)
            # only the allocation differs
            assert [r["allocation"] for r in a] != [r["allocation"] for r in b]
        seeds = [_run(compare_dir, partition, "fedra", s).read_metrics() for s in (0, 1)]
        assert [r["sampled"] for r in seeds[0]] != [r["sampled"] for r in seeds[1]]


def test_finished_runs_are_reused(compare_dir: Path, tiny_bert_dir: Path, tiny_text_csv: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import fedhello.studies.compare as sim

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(sim, "run_embedded", refuse)
    before = {p: p.stat().st_mtime_ns for p in compare_dir.glob("runs/**/metrics.jsonl")}
    assert main(_args(compare_dir, tiny_bert_dir, tiny_text_csv)) == 0
    assert {p: p.stat().st_mtime_ns for p in compare_dir.glob("runs/**/metrics.jsonl")} == before


def test_table_equals_an_independent_computation(compare_dir: Path) -> None:
    with open(compare_dir / "results.csv") as f:
        rows = {(r["partition"], r["strategy"]): r for r in csv.DictReader(f)}
    assert ("all", "centralized") in rows
    for partition in ("dirichlet", "iid"):
        for strategy in STRATEGIES:
            row = rows[(partition, strategy.replace(":", "-"))]
            runs = [_run(compare_dir, partition, strategy, s) for s in (0, 1)]
            accuracy = [json.loads(r.summary_path.read_text())["test_accuracy"] for r in runs]
            f1 = [json.loads(r.summary_path.read_text())["test_macro_f1"] for r in runs]
            assert float(row["acc_mean"]) == pytest.approx(np.mean(accuracy))
            assert float(row["acc_std"]) == pytest.approx(np.std(accuracy, ddof=1))
            assert float(row["f1_std"]) == pytest.approx(np.std(f1, ddof=1))
            last5 = [np.mean([x["test_accuracy"] for x in r.read_metrics()][-5:]) for r in runs]
            assert float(row["last5_mean"]) == pytest.approx(np.mean(last5))
            picked = []
            for r in runs:
                recs = r.read_metrics()
                best = max(x["val_accuracy"] for x in recs)
                picked.append(next(x for x in recs if x["val_accuracy"] == best)["test_accuracy"])
            assert float(row["val_selected_acc_mean"]) == pytest.approx(np.mean(picked))
    assert "± " in (compare_dir / "results.md").read_text()


def test_plots_are_written_and_not_blank(compare_dir: Path) -> None:
    import matplotlib.image as mpimg

    plots = sorted((compare_dir / "plots").glob("*.png"))
    kinds = {p.name.rsplit("-", 1)[0] for p in plots}
    assert kinds == {
        "accuracy", "coverage-heatmap", "coverage-vs-target", "client-cost",
        "accuracy-vs-resources", "paired.png",
    }  # fmt: skip
    assert len(plots) == 11  # five kinds x two partitions, and the paired differences
    for p in plots:
        img = mpimg.imread(p)
        assert img.shape[0] > 200 and img.std() > 0.01, p.name


def test_report_regenerates_from_saved_metrics(compare_dir: Path, tmp_path: Path) -> None:
    assert main(["report", str(compare_dir), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == (compare_dir / "results.md").read_text()
    assert len(list((tmp_path / "plots").glob("*.png"))) == 11
    single = _run(compare_dir, "iid", "fedra", 0).path
    assert main(["report", str(single), "--out", str(tmp_path / "one")]) == 0
    assert "fedra" in (tmp_path / "one" / "results.md").read_text()


def test_strategy_list_parsing() -> None:
    assert parse_strategies("all") == list(ALL_STRATEGIES)
    assert parse_strategies("fedra, fed-hello,fedra") == ["fedra", "fed-hello"]
    with pytest.raises(ConfigError, match="unknown strategy 'magic'"):
        parse_strategies("fedra,magic")
    with pytest.raises(ConfigError, match="unknown shape 'round'"):
        parse_strategies("geometric:round")
    # a shape only for strategies that take one (the option would not apply)
    with pytest.raises(ConfigError, match=r"'fedra' has no shape; allowed with a shape: fed-hello"):
        parse_strategies("fedra:triangle")


def test_the_baselines_are_rows_of_every_comparison() -> None:
    from fedhello.core.config import load_config
    from fedhello.studies.compare import Cell, cell_config

    assert {"hetlora", "flexlora", "ffa-lora", "fedra-subnetwork"} <= set(parse_strategies("all"))
    base = load_config(None, ["allocation.rank-penalty=0.01"])
    sub = cell_config(base, Cell("dirichlet", "fedra-subnetwork", 1))
    assert (sub.allocation.strategy, sub.allocation.client_model) == ("fedra", "subnetwork")
    het = cell_config(base, Cell("dirichlet", "hetlora", 1))
    assert het.allocation.options.rank_penalty == 0.01  # type: ignore[attr-defined]
    assert cell_config(base, Cell("dirichlet", "fedra", 1)).allocation.client_model == "full"
    # a rank method cannot take limits in real units: refused before any run starts
    limited = load_config(None, ["clients.budget-kind=memory-mb", "clients.tiers=[100, 200]"])
    with pytest.raises(ConfigError, match="a rank method takes layer budgets"):
        cell_config(limited, Cell("dirichlet", "flexlora", 0))
    with pytest.raises(ConfigError, match=r"FFA-LoRA .* cost profiles are measured with A and B"):
        cell_config(limited, Cell("dirichlet", "ffa-lora", 0))


def test_each_cell_keeps_only_its_strategy_options() -> None:
    from fedhello.core.config import load_config
    from fedhello.studies.compare import Cell, cell_config

    base = load_config(Path(__file__).parents[1] / "configs" / "compare.toml")
    fedra = cell_config(base, Cell("dirichlet", "fedra", 0))
    assert fedra.allocation.foreign_options() == [] and "shape" not in fedra.to_toml()
    hello = cell_config(base, Cell("dirichlet", "fed-hello", 0))
    assert hello.allocation.options.fisher_every == 2  # type: ignore[attr-defined]
    tri = cell_config(base, Cell("iid", "geometric:triangle", 1))
    assert tri.allocation.options.shape == "triangle" and tri.run.seed == 1  # type: ignore[attr-defined]


def test_reuse_ignores_operational_settings_and_names_real_differences(
    compare_dir: Path, tiny_bert_dir: Path, tiny_text_csv: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A changed Flower timeout or checkpoint period must not invalidate finished runs, nor a
    partition setting no compared split reads (the pathological classes per client, for
    Dirichlet and IID splits and the centralised reference); a changed learning rate must,
    with an error naming the setting and both values, and so must the Dirichlet alpha."""
    import fedhello.studies.compare as sim

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(sim, "run_embedded", refuse)
    base = _args(compare_dir, tiny_bert_dir, tiny_text_csv)
    ops = ["--set", "federation.node_wait=7", "--set", "run.checkpoint_every=2"]
    assert main(base + ops) == 0
    assert main([*base, "--set", "data.classes_per_client=3"]) == 0
    capsys.readouterr()
    assert main([*base, "--set", "train.lr=0.123"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr" in err[0] and "0.123" in err[0]
    assert main([*base, "--set", "data.dirichlet_alpha=0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.dirichlet_alpha (0.5 -> 0.1)" in err[0]


def test_the_centralised_reference_is_one_run_whatever_the_skew() -> None:
    """The reference (one client, IID) reads no partition setting: a comparison of another
    Dirichlet alpha or classes per client shares it; a federated cell of another one does
    not. Nor does a fit policy matter without limits."""
    from fedhello.core.config import load_config, outcome_differences
    from fedhello.studies.compare import Cell, cell_config
    from fedhello.studies.results import CENTRALIZED

    a = load_config(None, ["data.dirichlet_alpha=0.1", "data.classes_per_client=3"])
    b = load_config(None)
    ref = Cell(CENTRALIZED, CENTRALIZED, 0)
    assert outcome_differences(cell_config(a, ref), cell_config(b, ref)) == []
    diri, path = Cell("dirichlet", "fedra", 0), Cell("pathological", "fedra", 0)
    assert outcome_differences(cell_config(a, diri), cell_config(b, diri)) == [
        "data.dirichlet_alpha (0.1 -> 0.5)"
    ]
    assert outcome_differences(cell_config(a, path), cell_config(b, path)) == [
        "data.classes_per_client (3 -> 5)"
    ]
    # the fit policy acts on limits only: without any, a comparison of another one shares cells
    strict = load_config(None, ['allocation.fit="strict"'])
    assert outcome_differences(strict, b) == []
    limited = ['clients.budget_kind="memory-mb"', "clients.tiers=[100.0, 145.0, 200.0]"]
    assert outcome_differences(
        load_config(None, [*limited, 'allocation.fit="strict"']), load_config(None, limited)
    ) == ["allocation.fit ('strict' -> 'auto')"]


def test_the_centralised_reference_does_the_federations_work_by_plain_local_training() -> None:
    """Its steps per round are the federation's (m clients x local steps; under local epochs
    e, the e m / K of the pool the sampled clients are expected to train), with no server
    optimizer and no proximal term: a server step over one client's delta, or a pull to the
    round's start, is not centralised fine-tuning."""
    from fedhello.core.config import load_config, outcome_differences
    from fedhello.studies.compare import Cell, cell_config
    from fedhello.studies.results import CENTRALIZED

    ref = Cell(CENTRALIZED, CENTRALIZED, 0)
    plain = cell_config(load_config(None), ref)
    assert plain.train.local_steps == 6 * 10 and plain.train.local_epochs is None
    moved = load_config(None, [
        'federation.server_optimizer="fedadam"', "federation.server_lr=0.01",
        "federation.server_tau=0.01", "train.proximal_mu=0.1",
    ])  # fmt: skip
    assert moved.federation.server_optimizer == "fedadam"
    assert outcome_differences(cell_config(moved, ref), plain) == []
    momentum = load_config(None, ["federation.server_momentum=0.9"])
    assert outcome_differences(cell_config(momentum, ref), plain) == []
    epochs = cell_config(load_config(None, ["train.local_epochs=2"]), ref)
    # 12 clients, 6 a round, 2 epochs each: the pool's half, twice, is one epoch of it
    assert epochs.train.local_epochs == pytest.approx(2 * 6 / 12)
    assert epochs.clients.num_clients == 1 and epochs.federation.server_optimizer == "fedavg"


def test_the_paired_interval_is_students_t() -> None:
    from fedhello.studies.paired import t_interval

    low, high = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, std 1.581, t(0.975, 4) 2.776
    assert (low, high) == (pytest.approx(1.0368, abs=1e-3), pytest.approx(4.9632, abs=1e-3))
    assert np.isnan(t_interval([2.0])[0])


def test_seeds_to_settle_is_the_first_n_whose_interval_excludes_zero() -> None:
    from fedhello.studies.paired import SETTLE_CAP, seeds_to_settle, settle_text

    # mean 0.3, sd 0.9: t(0.975, 36) = 2.0281 -> 2.0281 x 0.9 / sqrt(37) = 0.30008 >= 0.3;
    # t(0.975, 37) = 2.0262 -> 2.0262 x 0.9 / sqrt(38) = 0.29583 < 0.3 (tables' values)
    assert seeds_to_settle(0.3, 0.9) == 38
    assert seeds_to_settle(-0.3, 0.9) == 38  # the sign does not matter
    # mean 3, sd 1.58 over 5 seeds: [1.04, 4.96] excludes 0; at 3 seeds t(0.975, 2) = 4.303,
    # 4.303 x 1.58 / sqrt(3) = 3.93 > 3; at 4, 3.182 x 1.58 / 2 = 2.51 < 3
    assert seeds_to_settle(3.0, 1.58) == 4
    assert seeds_to_settle(5.0, 0.0) == 2
    assert seeds_to_settle(0.0, 1.0) is None and seeds_to_settle(1.0, float("nan")) is None
    assert seeds_to_settle(0.01, 5.0) == SETTLE_CAP + 1
    row = {"final_diff_ci95_low": -0.7, "final_diff_ci95_high": 1.4, "seeds_to_settle": 38}
    assert settle_text(row) == "38"
    assert settle_text(row | {"final_diff_ci95_low": 0.2}) == "settled"
    assert settle_text(row | {"seeds_to_settle": SETTLE_CAP + 1}) == f"> {SETTLE_CAP}"


def test_paired_differences_equal_an_independent_computation(
    compare_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with open(compare_dir / "paired.csv") as f:
        rows = {(r["partition"], r["strategy"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("dirichlet", "geometric-triangle"), ("iid", "geometric-triangle")}
    for (partition, strategy), row in rows.items():
        assert row["baseline"] == "fedra"  # the default baseline when present
        diffs = [
            100 * (_run(compare_dir, partition, strategy, k).read_summary()["test_accuracy"]
                   - _run(compare_dir, partition, "fedra", k).read_summary()["test_accuracy"])
            for k in (0, 1)
        ]  # fmt: skip
        assert float(row["final_diff_mean"]) == pytest.approx(np.mean(diffs))
        assert float(row["final_diff_std"]) == pytest.approx(np.std(diffs, ddof=1))
        assert int(row["wins"]) + int(row["ties"]) + int(row["losses"]) == 2
        assert int(row["wins"]) == sum(d > 0 for d in diffs)
        # two seeds: t(0.975, 1) = 12.706, half-width 12.706 x std / sqrt(2)
        half = 12.706 * np.std(diffs, ddof=1) / np.sqrt(2)
        assert float(row["final_diff_ci95_low"]) == pytest.approx(np.mean(diffs) - half, rel=1e-3)
        assert float(row["final_diff_ci95_high"]) == pytest.approx(np.mean(diffs) + half, rel=1e-3)
        if row["seeds_to_settle"]:  # the first n whose half-width is below the gap
            n, gap, sd = int(row["seeds_to_settle"]), abs(np.mean(diffs)), np.std(diffs, ddof=1)
            assert stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n) < gap or n > 200
            assert n == 2 or stats.t.ppf(0.975, n - 2) * sd / np.sqrt(n - 1) >= gap
    assert "seeds to settle" in (compare_dir / "paired.md").read_text()
    written = {p: p.stat().st_mtime_ns for p in compare_dir.glob("*.*")}
    assert main(["report", str(compare_dir), "--baseline", "magic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'magic'" in err[0] and "fedra" in err[0]
    assert {p: p.stat().st_mtime_ns for p in compare_dir.glob("*.*")} == written


# ---- numerics versions ----------------------------------------------------------------------


def _cells_with_versions(
    compare_dir: Path, tmp_path: Path, versions: dict[tuple[str, str, int], int | None]
) -> tuple[Path, Config]:
    """A copy of the comparison whose cells record the given numerics versions (None: the key
    removed, as in a run written before fedhello recorded it), and its base config."""
    import shutil

    from fedhello.core.config import build_saved_config

    root = tmp_path / "c"
    shutil.copytree(compare_dir, root)
    for (partition, strategy, seed), version in versions.items():
        run = _run(root, partition, strategy, seed)
        summary = run.read_summary()
        summary.pop("numerics_version")
        if version is not None:
            summary["numerics_version"] = version
        run.write_summary(summary)
    base = build_saved_config(json.loads((root / "compare.json").read_text())["base_config"])
    return root, base


def test_runs_record_their_numerics_version(compare_dir: Path) -> None:
    from fedhello.core.numerics import NUMERICS_VERSION, recorded_version

    summaries = [json.loads(p.read_text()) for p in compare_dir.glob("runs/**/summary.json")]
    assert summaries and all(s["numerics_version"] == NUMERICS_VERSION for s in summaries)
    assert recorded_version({"test_accuracy": 0.5}) == 1  # written before the record: version 1


def test_a_cell_of_another_numerics_version_is_run_again_a_same_version_one_reused(
    compare_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """As after a bump to version 2: a cell of version 1 (recorded, or recording none) is
    computed again, over its old files; a cell of version 2 is reused untouched."""
    import logging

    import fedhello.studies.compare as sim
    from fedhello.engine.core import RunOptions
    from fedhello.studies.compare import Cell, cell_config, run_cell

    root, base = _cells_with_versions(compare_dir, tmp_path, {
        ("iid", "fedra", 0): 2, ("iid", "fedra", 1): 1, ("dirichlet", "fedra", 0): None,
    })  # fmt: skip
    monkeypatch.setattr(sim, "NUMERICS_VERSION", 2)
    calls: list[tuple[Path, RunOptions]] = []
    monkeypatch.setattr(sim, "run_embedded", lambda cfg, run, opts: calls.append((run.path, opts)))
    outcomes = {}
    with caplog.at_level(logging.WARNING, logger="fedhello"):
        for partition, seed in (("iid", 0), ("iid", 1), ("dirichlet", 0)):
            cell = Cell(partition, "fedra", seed)
            outcomes[partition, seed] = run_cell(cell, cell_config(base, cell), root)
    assert outcomes == {("iid", 0): "reused", ("iid", 1): "rerun", ("dirichlet", 0): "rerun"}
    rerun = {_run(root, "iid", "fedra", 1).path, _run(root, "dirichlet", "fedra", 0).path}
    assert {path for path, _ in calls} == rerun
    assert all(opts.overwrite and not opts.resume for _, opts in calls)  # replaced, not resumed
    warned = [r.getMessage() for r in caplog.records if "numerics version" in r.getMessage()]
    assert len(warned) == 2 and all("version 1" in m and "version 2" in m for m in warned)


def test_a_cell_of_a_newer_numerics_version_is_refused(
    compare_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older fedhello must not replace what a newer one computed: one line, nothing run."""
    import fedhello.studies.compare as sim
    from fedhello.core.errors import RunDirError
    from fedhello.studies.compare import Cell, cell_config, run_cell

    root, base = _cells_with_versions(compare_dir, tmp_path, {("iid", "fedra", 0): 7})
    monkeypatch.setattr(sim, "run_embedded", lambda *a: pytest.fail("a newer cell was rerun"))
    cell = Cell("iid", "fedra", 0)
    with pytest.raises(RunDirError, match=r"numerics version 7, newer than this fedhello's 1"):
        run_cell(cell, cell_config(base, cell), root)


def test_an_unfinished_cell_resumes_only_from_a_checkpoint_of_its_version(
    compare_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crashed cell is judged by its newest checkpoint, which a resume would continue from:
    after a bump it is computed again; without a checkpoint a resume starts at round 1 anyway."""
    import fedhello.studies.compare as sim
    from fedhello.core.numerics import NUMERICS_VERSION
    from fedhello.studies.compare import Cell, cell_config, run_cell

    root, base = _cells_with_versions(compare_dir, tmp_path, {})
    cell = Cell("iid", "fedra", 0)
    run = _run(root, "iid", "fedra", 0)
    run.summary_path.unlink()  # crashed after its last checkpoint
    metas = sorted(run.checkpoint_dir.glob("round-*.json"))
    assert metas and json.loads(metas[-1].read_text())["numerics_version"] == NUMERICS_VERSION
    calls: list[bool] = []
    monkeypatch.setattr(sim, "run_embedded", lambda cfg, r, opts: calls.append(opts.resume))
    assert run_cell(cell, cell_config(base, cell), root) == "resumed" and calls == [True]
    monkeypatch.setattr(sim, "NUMERICS_VERSION", NUMERICS_VERSION + 1)
    assert run_cell(cell, cell_config(base, cell), root) == "rerun" and calls[-1] is False
    for meta in metas:
        meta.unlink()
    assert run_cell(cell, cell_config(base, cell), root) == "resumed"


def test_a_checkpoint_of_another_numerics_version_is_not_resumed(tmp_path: Path) -> None:
    import fedhello.store.checkpoint as ckpt
    from fedhello.core.errors import RunDirError

    state = {"w": np.ones(3, dtype=np.float32)}
    meta = ckpt.save_checkpoint(tmp_path, 1, state, {}, {}, "hash")
    assert ckpt.load_latest(tmp_path, "hash", {"w"}) is not None
    data = json.loads(meta.read_text())
    del data["numerics_version"]  # written before the record: version 1, still resumable
    meta.write_text(json.dumps(data))
    assert ckpt.checkpoint_numerics(tmp_path) == 1
    assert ckpt.load_latest(tmp_path, "hash", {"w"}) is not None
    data["numerics_version"] = 2
    meta.write_text(json.dumps(data))
    with pytest.raises(RunDirError, match=r"numerics version 2, this fedhello computes version 1"):
        ckpt.load_latest(tmp_path, "hash", {"w"})


def test_report_warns_about_a_folder_that_mixes_numerics_versions(
    compare_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from fedhello.studies.report import write_report

    with caplog.at_level(logging.WARNING, logger="fedhello"):
        write_report(compare_dir, tmp_path / "same")
    assert "numerics" not in caplog.text
    root, _ = _cells_with_versions(compare_dir, tmp_path, {("iid", "fedra", 0): 2})
    with caplog.at_level(logging.WARNING, logger="fedhello"):
        write_report(root, tmp_path / "mixed")
    assert "mixes numerics versions" in caplog.text and "1 run(s) of version 2" in caplog.text


def test_memory_columns_read_the_measure_the_limits_bound() -> None:
    """On an accelerator a limit bounds the allocator's peak (device_peak_memory_mb), on a CPU
    the meter's train_memory_mb: the per-tier columns and the resource plots read the same."""
    from fedhello.studies.report import summarize
    from fedhello.studies.results import Row, RunData

    def client(tier: int, meter: float, device: float | None) -> dict:
        return {"tier": tier, "train_memory_mb": meter, "device_peak_memory_mb": device,
                "memory_limit_mb": 900.0, "layers": [0]}  # fmt: skip

    summary = {"test_accuracy": 0.5, "test_macro_f1": 0.4, "client_seconds": 1.0,
               "bytes_up": 0, "bytes_down": 0}  # fmt: skip
    rec = {"round": 1, "test_accuracy": 0.5, "clients": [client(0, 100.0, 800.0),
                                                          client(1, 300.0, None)]}  # fmt: skip
    run = RunData("iid", "fedra", 0, [rec], summary)
    (row,) = summarize([Row("iid", "fedra", [run])])
    assert row["train_mb_max_by_tier"] == {0: 800.0, 1: 300.0}
    from fedhello.studies.plots import mean_train_mb, peak_train_mb

    assert (peak_train_mb(run), mean_train_mb(run)) == (800.0, 550.0)  # the plots read it too


def _with_summary(root: Path, partition: str, seed: int, **changes: object) -> None:
    run = _run(root, partition, "fedra", seed)
    run.write_summary(run.read_summary() | changes)


def test_a_cell_from_another_device_or_thread_count_is_refused(
    compare_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cell computed on a GPU, or with another torch thread count (``run.threads = 0``
    resolves to the machine's cores), holds other numbers: refused, never mixed in."""
    import torch

    import fedhello.studies.compare as sim
    from fedhello.core.errors import RunDirError
    from fedhello.studies.compare import Cell, cell_config, run_cell

    root, base = _cells_with_versions(compare_dir, tmp_path, {})
    here = base.run.threads or torch.get_num_threads()
    summary = _run(root, "iid", "fedra", 0).read_summary()
    assert summary["device"] == "cpu" and summary["torch_threads"] == here
    monkeypatch.setattr(sim, "run_embedded", lambda *a: pytest.fail("a cell was recomputed"))
    _with_summary(root, "iid", 0, device="cuda:0")
    _with_summary(root, "iid", 1, torch_threads=here + 3)
    cell = Cell("iid", "fedra", 0)
    with pytest.raises(RunDirError, match=r"device \('cuda' -> 'cpu'\)"):
        run_cell(cell, cell_config(base, cell), root)
    cell = Cell("iid", "fedra", 1)
    want = rf"torch_threads \({here + 3} -> {here}, run.threads = {base.run.threads}\)"
    with pytest.raises(RunDirError, match=want):
        run_cell(cell, cell_config(base, cell), root)
    # a run from before the thread count was recorded is judged by what it did record
    _with_summary(root, "iid", 1, torch_threads=None)
    assert run_cell(cell, cell_config(base, cell), root) == "reused"


def test_the_report_names_the_code_that_computed_its_runs(
    compare_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from fedhello.store.provenance import code_provenance
    from fedhello.studies.report import write_report

    code = _run(compare_dir, "iid", "fedra", 0).read_summary()["code"]
    assert code == code_provenance() and code["torch"].startswith("2.13.0")
    write_report(compare_dir, tmp_path / "same")
    md = (tmp_path / "same" / "results.md").read_text()
    label = code["commit"][:7] + ("+modified" if code["modified"] else "") if code["commit"] else ""
    assert f"Computed by fedhello at: {label or 'fedhello'}" in md
    root, _ = _cells_with_versions(compare_dir, tmp_path, {})
    _with_summary(root, "iid", 0, code=code | {"commit": "f" * 40, "modified": False})
    _with_summary(root, "iid", 1, code=None)
    with caplog.at_level(logging.WARNING, logger="fedhello"):
        write_report(root, tmp_path / "mixed")
    md = (tmp_path / "mixed" / "results.md").read_text()
    assert "fffffff (1 run)" in md and "unrecorded (1 run)" in md
    if code["commit"]:  # two commits side by side: said in the log
        assert "computed by different code" in caplog.text


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--seeds", "0,1,0"], "seeds '0,1,0': 0 repeated"),
        (["--baseline", "bogus"], "--baseline 'bogus': not a compared strategy"),
    ],
)
def test_compare_flags_are_checked_before_any_cell_runs(
    extra: list[str], words: str, tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import fedhello.studies.compare as sim

    monkeypatch.setattr(sim, "run_embedded", lambda *a: pytest.fail("a cell ran"))
    args = _args(tmp_path / "c", tiny_bert_dir, tiny_text_csv)
    i = args.index("--seeds")
    args = [*args[:i], *args[i + 2 :], *(extra if "--seeds" in extra else ["--seeds", "0"]),
            *([] if "--seeds" in extra else extra)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "c").exists()


def test_compare_refuses_a_folder_that_is_not_a_comparisons(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import fedhello.studies.compare as sim

    monkeypatch.setattr(sim, "run_embedded", lambda *a: pytest.fail("a cell ran"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("mine")
    (tmp_path / "afile").write_text("x")
    for out, words in ((tmp_path / "notes", "holds what is not a comparison's (e.g. 'thesis.tex')"),
                       (tmp_path / "afile", "is a file")):  # fmt: skip
        assert main(_args(out, tiny_bert_dir, tiny_text_csv)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["thesis.tex"]
    # a folder holding only cells linked in from another comparison is a comparison's
    (tmp_path / "linked" / "runs").mkdir(parents=True)
    from fedhello.studies.request import check_folder

    check_folder(tmp_path / "linked")


def test_a_cell_of_an_older_numerics_version_is_rerun_whatever_machine_made_it(
    compare_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedhello.studies.compare as sim
    from fedhello.studies.compare import Cell, cell_config, run_cell

    root, base = _cells_with_versions(compare_dir, tmp_path, {("iid", "fedra", 0): 1})
    _with_summary(root, "iid", 0, device="cuda:0")
    monkeypatch.setattr(sim, "NUMERICS_VERSION", 2)
    monkeypatch.setattr(sim, "run_embedded", lambda cfg, run, opts: None)
    cell = Cell("iid", "fedra", 0)
    assert run_cell(cell, cell_config(base, cell), root) == "rerun"  # not refused


def test_one_seed_shows_its_value_without_a_spread(text_run: Path, tmp_path: Path) -> None:
    """A single run's row is its value: "x ± 0.0" would read as a spread measured over seeds."""
    out = tmp_path / "report"
    assert main(["report", str(text_run), "--out", str(out)]) == 0
    row = next(line for line in (out / "results.md").read_text().splitlines()
               if line.startswith("| ") and "| 1 |" in line)  # fmt: skip
    acc = 100 * RunDir(text_run).read_summary()["test_accuracy"]
    assert f"| 1 | {acc:.1f} | " in row and "±" not in row


def test_a_comparison_whose_model_data_or_device_is_missing_writes_nothing(
    tmp_path: Path,
) -> None:
    """Checked before compare.json or any cell's lock is written (they used to be left behind,
    a half comparison): a new folder is not made, an existing one is left as it was."""
    from fedhello.core.config import load_config
    from fedhello.core.errors import DataError, UserError
    from fedhello.studies.compare import run_compare

    no_data = load_config(None, [f'data.name="{tmp_path / "nope.csv"}"'])
    no_model = load_config(None, [f'model.name="{tmp_path / "no-model"}"'])
    new = tmp_path / "new" / "cmp"
    with pytest.raises(DataError, match="file does not exist"):
        run_compare(no_data, new, ["fedra"], [0], ["iid"])
    with pytest.raises(UserError, match="no-model"):
        run_compare(no_model, new, ["fedra"], [0], ["iid"])
    assert not (tmp_path / "new").exists()
    held = tmp_path / "held"  # a comparison of the same base config: as it was
    (held / "runs" / "iid" / "full" / "seed0").mkdir(parents=True)
    spec = json.dumps({"strategies": ["full"], "seeds": [0], "partitions": ["iid"],
                       "base_config": no_data.to_dict()}).encode()  # fmt: skip
    (held / "compare.json").write_bytes(spec)
    before = sorted(held.rglob("*"))
    with pytest.raises(DataError):
        run_compare(no_data, held, ["fedra"], [0], ["iid"])
    assert sorted(held.rglob("*")) == before and (held / "compare.json").read_bytes() == spec
