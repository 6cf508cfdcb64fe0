"""A report across comparisons (``fedhello report DIR DIR ... --out OUT``): every folder's
paired rows side by side, against an independent computation from the runs' summaries."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from conftest import tiny_overrides
from scipy import stats

from fedhello.cli import main


def _compare(out: Path, model: Path, data: Path, rounds: int) -> Path:
    ov = tiny_overrides(model, data, data__text_column='"sentence"', data__label_column='"topic"',
                        federation__rounds=rounds)  # fmt: skip
    args = ["compare", "--strategies", "fedra,geometric:triangle,full", "--seeds", "0,1,2",
            "--partitions", "dirichlet", "--out", str(out)]  # fmt: skip
    for o in ov:
        args += ["--set", o]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def two_regimes(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_text_csv: Path
) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("regimes")
    return (_compare(root / "short", tiny_bert_dir, tiny_text_csv, 2),
            _compare(root / "long", tiny_bert_dir, tiny_text_csv, 3))  # fmt: skip


def _acc(folder: Path, strategy: str, seed: int) -> float:
    cell = "centralized" if strategy == "centralized" else f"dirichlet/{strategy}"
    summary = json.loads((folder / "runs" / cell / f"seed{seed}" / "summary.json").read_text())
    return float(summary["test_accuracy"])


def test_rows_equal_an_independent_computation_per_folder(
    two_regimes: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "across"
    paths = [str(p) for p in two_regimes]
    assert main(["report", *paths, "--out", str(out), "--strategies", "geometric:triangle"]) == 0
    assert "| short | dirichlet | geometric-triangle | fedra | 3 |" in capsys.readouterr().out
    with open(out / "regimes.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["regime"], r["strategy"]) for r in rows] == [
        ("short", "geometric-triangle"),
        ("long", "geometric-triangle"),
    ]  # folder order; full's rows left out
    for folder, row in zip(two_regimes, rows, strict=True):
        mine = [_acc(folder, "geometric-triangle", s) for s in range(3)]
        base = [_acc(folder, "fedra", s) for s in range(3)]
        ref = [_acc(folder, "centralized", s) for s in range(3)]
        diffs = [100 * (a - b) for a, b in zip(mine, base, strict=True)]
        assert len(set(mine)) > 1  # seeds differ: a wrong pairing of seeds would show
        assert [float(d) for d in row["final_diffs"].split()] == pytest.approx(diffs, abs=1e-4)
        assert float(row["final_diff_mean"]) == pytest.approx(statistics.fmean(diffs))
        half = stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / 3**0.5
        assert float(row["final_diff_ci95_low"]) == pytest.approx(statistics.fmean(diffs) - half)
        assert float(row["strategy_mean"]) == pytest.approx(100 * statistics.fmean(mine))
        assert float(row["baseline_mean"]) == pytest.approx(100 * statistics.fmean(base))
        ratio = statistics.fmean(a / r for a, r in zip(mine, ref, strict=True))
        assert float(row["strategy_over_centralized"]) == pytest.approx(ratio)
        assert int(row["wins"]) == sum(d > 0 for d in diffs)
    assert (out / "regimes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "regimes.md" in {p.name for p in out.iterdir()}


def test_a_single_folder_report_draws_its_paired_differences(
    two_regimes: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "one"
    assert main(["report", str(two_regimes[0]), "--out", str(out)]) == 0
    assert (out / "plots" / "paired.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "paired.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["strategy"] == "full")
    assert len(row["final_diffs"].split()) == 3


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ([], "--out is needed"),
        (["--out", "X", "--strategies", "magic"], "--strategies magic: not paired"),
        (["--out", "X", "--baseline", "magic"], "not a compared strategy"),
    ],
)
def test_bad_input_across_folders_is_one_line(
    two_regimes: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    extra: list[str], says: str,
) -> None:  # fmt: skip
    extra = [str(tmp_path / "x") if a == "X" else a for a in extra]
    assert main(["report", *map(str, two_regimes), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not (tmp_path / "x").exists()


def test_strategies_need_several_folders(
    two_regimes: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(two_regimes[0]), "--strategies", "fedra"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "with several folders" in err[0]


# ---- hand-written folders: the edge cases chosen on purpose ---------------------------------


def _fake(root: Path, cells: dict[str, dict[int, float]], ref: dict[int, float] | None = None,
          key: str = "test_accuracy") -> Path:  # fmt: skip
    """A comparison folder of finished runs with the given final scores (dirichlet split)."""
    for name, seeds in [*cells.items(), *([("centralized", ref)] if ref else [])]:
        for seed, score in seeds.items():
            cell = "centralized" if name == "centralized" else f"dirichlet/{name}"
            run = root / "runs" / cell / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({key: score}))
    return root


def _report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    rc = main(["report", *args])
    return rc, capsys.readouterr().err.strip().splitlines()


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "regimes.csv") as f:
        return list(csv.DictReader(f))


def test_means_pair_on_common_seeds_and_ratios_need_every_seeds_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _fake(tmp_path / "a" / "recipe",
              {"fedra": {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.9}, "fed-hello": {0: 0.52, 1: 0.61, 2: 0.69}},
              ref={0: 0.8, 1: 0.8})  # seed 2 has no reference  # fmt: skip
    b = _fake(tmp_path / "b" / "recipe",
              {"fedra": {0: 0.5, 1: 0.6}, "fed-hello": {0: 0.55, 1: 0.6}},
              ref={0: 1.0, 1: 0.75})  # fmt: skip
    out = tmp_path / "out"
    assert _report(capsys, str(a), str(b), "--out", str(out))[0] == 0
    first, second = _rows(out)
    assert (first["regime"], second["regime"]) == ("a/recipe", "b/recipe")  # told apart
    assert int(first["seeds"]) == 3  # seed 3 has no fed-hello run: not paired
    assert float(first["baseline_mean"]) == pytest.approx(60.0)  # fedra over seeds 0-2 only
    assert float(first["strategy_mean"]) == pytest.approx(60.6667, abs=1e-3)
    assert first["strategy_over_centralized"] == "nan"  # seed 2 has no reference: no ratio
    assert float(second["strategy_over_centralized"]) == pytest.approx((0.55 + 0.6 / 0.75) / 2)
    assert float(second["baseline_over_centralized"]) == pytest.approx((0.5 + 0.6 / 0.75) / 2)
    assert [float(d) for d in second["final_diffs"].split()] == pytest.approx([5.0, 0.0])
    assert (second["wins"], second["ties"], second["losses"]) == ("1", "1", "0")
    table = (out / "regimes.md").read_text()
    assert "| a/recipe | dirichlet | fed-hello | fedra | 3 | +2.0 +1.0 -1.0 |" in table
    assert "| -, - |" in table


def test_a_reference_that_scored_zero_gives_no_ratio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _fake(tmp_path / "a", {"fedra": {0: 0.1, 1: 0.2}, "full": {0: 0.2, 1: 0.2}},
              ref={0: 0.0, 1: 0.3}, key="test_rouge_l")  # fmt: skip
    b = _fake(tmp_path / "b", {"fedra": {0: 0.1}, "full": {0: 0.3}}, key="test_rouge_l")
    out = tmp_path / "out"
    assert _report(capsys, str(a), str(b), "--out", str(out))[0] == 0
    rows = _rows(out)
    assert rows[0]["strategy_over_centralized"] == "nan" and rows[1]["seeds"] == "1"
    assert "ROUGE-L on the fixed generation subset" in (out / "regimes.md").read_text()


def test_refusals_across_folders_are_one_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _fake(tmp_path / "a", {"fedra": {0: 0.5}, "geometric-bottleneck": {0: 0.6}})
    b = _fake(tmp_path / "b", {"fedra": {0: 0.5}, "fed-hello": {0: 0.4}})
    alone = _fake(tmp_path / "alone", {"fedra": {0: 0.5}})
    out = str(tmp_path / "out")
    cases = [
        ([str(a), str(tmp_path / "a" / "."), "--out", out], "is given twice"),
        ([str(a), str(b), "--out", out, "--strategies", "fed-hello,fed-helo"],
         "--strategies fed-helo: not paired"),
        ([str(a), str(b), "--out", out, "--strategies", "fedra"], "fedra is the baseline"),
        ([str(alone), str(alone.parent / "a"), "--out", str(a)], "one of the compared folders"),
        ([str(alone), str(tmp_path / "alone"), "--out", out], "is given twice"),
    ]  # fmt: skip
    for args, says in cases:
        rc, err = _report(capsys, *args)
        assert rc == 2 and len(err) == 1 and says in err[0], (args, err)
    single = _fake(tmp_path / "single", {"fedra": {0: 0.5}})
    rc, err = _report(capsys, str(alone), str(single), "--out", out)
    assert rc == 2 and "nothing to pair" in err[-1]
    assert not (tmp_path / "out").exists()
    assert not (a / "regimes.md").exists()


def test_baseline_may_be_named_with_its_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _fake(tmp_path / "a", {"fedra": {0: 0.5}, "geometric-bottleneck": {0: 0.6}})
    b = _fake(tmp_path / "b", {"fedra": {0: 0.5}, "geometric-bottleneck": {0: 0.4}})
    out = tmp_path / "out"
    assert _report(capsys, str(a), str(b), "--out", str(out),
                   "--baseline", "geometric:bottleneck")[0] == 0  # fmt: skip
    assert [r["strategy"] for r in _rows(out)] == ["fedra", "fedra"]
