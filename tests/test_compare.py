"""Paired comparisons: same partitions and clients, reuse of finished runs, honest tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides

from fedhello.cli import main
from fedhello.core.errors import ConfigError
from fedhello.store.runs import RunDir
from fedhello.studies.compare import ALL_STRATEGIES, parse_strategies

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
            acc = [json.loads(r.summary_path.read_text())["test_accuracy"] for r in runs]
            f1 = [json.loads(r.summary_path.read_text())["test_macro_f1"] for r in runs]
            assert float(row["acc_mean"]) == pytest.approx(np.mean(acc))
            assert float(row["acc_std"]) == pytest.approx(np.std(acc, ddof=1))
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
        "accuracy-vs-resources",
    }  # fmt: skip
    assert len(plots) == 10  # five kinds x two partitions
    for p in plots:
        img = mpimg.imread(p)
        assert img.shape[0] > 200 and img.std() > 0.01, p.name


def test_report_regenerates_from_saved_metrics(compare_dir: Path, tmp_path: Path) -> None:
    assert main(["report", str(compare_dir), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == (compare_dir / "results.md").read_text()
    assert len(list((tmp_path / "plots").glob("*.png"))) == 10
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
    """A changed Flower timeout or checkpoint period must not invalidate finished runs; a
    changed learning rate must, with an error naming the setting and both values."""
    import fedhello.studies.compare as sim

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(sim, "run_embedded", refuse)
    base = _args(compare_dir, tiny_bert_dir, tiny_text_csv)
    ops = ["--set", "federation.node_wait=7", "--set", "run.checkpoint_every=2"]
    assert main(base + ops) == 0
    capsys.readouterr()
    assert main([*base, "--set", "train.lr=0.123"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr" in err[0] and "0.123" in err[0]


def test_the_paired_interval_is_students_t() -> None:
    from fedhello.studies.paired import t_interval

    low, high = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, std 1.581, t(0.975, 4) 2.776
    assert (low, high) == (pytest.approx(1.0368, abs=1e-3), pytest.approx(4.9632, abs=1e-3))
    assert np.isnan(t_interval([2.0])[0])


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
    written = {p: p.stat().st_mtime_ns for p in compare_dir.glob("*.*")}
    assert main(["report", str(compare_dir), "--baseline", "magic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'magic'" in err[0] and "fedra" in err[0]
    assert {p: p.stat().st_mtime_ns for p in compare_dir.glob("*.*")} == written
