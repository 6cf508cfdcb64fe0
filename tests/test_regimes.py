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
        (["--out", "X", "--strategies", "magic"], "--strategies magic: none is paired"),
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
