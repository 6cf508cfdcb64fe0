"""`fedhello compare` on a generative task: strategies of a causal-lm federation paired on
ROUGE-L, the validation split choosing among the generated rounds, loss curves, and a folder
mixing task kinds refused. Scores are recomputed here from each run's own files."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from conftest import lm_overrides

from fedhello.cli import main
from fedhello.core.errors import RunDirError
from fedhello.studies.results import RunData
from fedhello.studies.scores import ACCURACY, ROUGE_L, scoring_of

STRATEGIES = ("fedra", "deepest-fit")


def test_the_validation_loss_chooses_among_generated_rounds() -> None:
    records = [
        {"round": 1, "val_loss": 0.5},  # the lowest loss, but nothing was generated
        {"round": 2, "val_loss": 0.9, "test_rouge_l": 0.30},
        {"round": 3, "val_loss": 0.4},
        {"round": 4, "val_loss": 0.7, "test_rouge_l": 0.20},
        {"round": 5, "val_loss": 0.7, "test_rouge_l": 0.25},  # ties round 4: the earlier wins
    ]
    assert ROUGE_L.val_selected(records) == (4, 0.20)
    # without a validation split the last generated round; without generation nothing
    assert ROUGE_L.val_selected([{k: v for k, v in r.items() if k != "val_loss"}
                                 for r in records]) == (5, 0.25)  # fmt: skip
    assert ROUGE_L.val_selected([{"round": 1, "val_loss": 0.3}]) is None
    # a classifier: the highest validation accuracy, the earliest of equals
    acc = [{"round": k, "val_accuracy": v, "test_accuracy": t}
           for k, v, t in [(1, 0.2, 0.1), (2, 0.6, 0.5), (3, 0.6, 0.7)]]  # fmt: skip
    assert ACCURACY.val_selected(acc) == (2, 0.5)


def test_a_folder_mixing_task_kinds_is_refused_in_one_line() -> None:
    lm = RunData("iid", "fedra", 0, [], {"test_rouge_l": 0.2, "test_accuracy": None})
    clf = RunData("iid", "full", 1, [], {"test_accuracy": 0.5})
    assert scoring_of([lm]) is ROUGE_L and scoring_of([clf]) is ACCURACY
    with pytest.raises(RunDirError) as err:
        scoring_of([lm, clf])
    assert "\n" not in str(err.value)
    assert "classification: iid/full/seed1; generation: iid/fedra/seed0" in str(err.value)


@pytest.fixture(scope="module")
def lm_compare(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_alpaca_jsonl: Path
) -> Path:
    out = tmp_path_factory.mktemp("lm-compare") / "c"
    ov = lm_overrides(tiny_llama_dir, tiny_alpaca_jsonl, federation__rounds=3,
                      federation__generate_every=2, data__validation_fraction=0.1)  # fmt: skip
    args = ["compare", "--strategies", ",".join(STRATEGIES), "--seeds", "0,1",
            "--partitions", "iid", "--out", str(out)]  # fmt: skip
    for o in ov:
        args += ["--set", o]
    assert main(args) == 0
    return out


def _read(root: Path, strategy: str, seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run = root / "runs" / "iid" / strategy / f"seed{seed}"
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def test_compare_tabulates_rouge_l_per_strategy(lm_compare: Path) -> None:
    rows = {
        r["strategy"]: r
        for r in csv.DictReader((lm_compare / "results.csv").read_text().splitlines())
    }
    assert set(rows) == {*STRATEGIES, "centralized"}
    for strategy in STRATEGIES:
        runs = [_read(lm_compare, strategy, seed) for seed in (0, 1)]
        row = rows[strategy]
        assert float(row["rouge_l_mean"]) == pytest.approx(
            statistics.fmean(s["test_rouge_l"] for s, _ in runs)
        )
        assert float(row["perplexity_mean"]) == pytest.approx(
            statistics.fmean(s["test_perplexity"] for s, _ in runs)
        )
        # generated in round 2 only (of 3): the val-selected round is round 2 in every seed
        generated = [[r["round"] for r in recs if "test_rouge_l" in r] for _, recs in runs]
        assert generated == [[2], [2]]
        assert float(row["val_round_mean"]) == 2.0
        assert float(row["val_selected_rouge_l_mean"]) == pytest.approx(
            statistics.fmean(
                next(r["test_rouge_l"] for r in recs if r["round"] == 2) for _, recs in runs
            )
        )
        # the zero-shot reference: the same prompts, the same base model in every run
        assert {s["zero_shot_rouge_l"] for s, _ in runs} == {float(row["zero_shot_rouge_l_mean"])}
    table = (lm_compare / "results.md").read_text()
    assert "| final ROUGE-L | exact match | test perplexity | zero-shot ROUGE-L |" in table
    assert "acc" not in table.splitlines()[0]


def test_paired_rouge_l_differences_against_fedra(lm_compare: Path) -> None:
    (row,) = list(csv.DictReader((lm_compare / "paired.csv").read_text().splitlines()))
    assert (row["strategy"], row["baseline"], row["seeds"]) == ("deepest-fit", "fedra", "2")
    diffs = [
        100 * (_read(lm_compare, "deepest-fit", k)[0]["test_rouge_l"]
               - _read(lm_compare, "fedra", k)[0]["test_rouge_l"])
        for k in (0, 1)
    ]  # fmt: skip
    assert float(row["final_diff_mean"]) == pytest.approx(statistics.fmean(diffs))
    assert float(row["final_diff_std"]) == pytest.approx(statistics.stdev(diffs))
    wins = sum(d > 0 for d in diffs)
    assert (int(row["wins"]), int(row["losses"])) == (wins, sum(d < 0 for d in diffs))
    assert "final ROUGE-L diff (points)" in (lm_compare / "paired.md").read_text()


def test_loss_curves_and_rouge_l_against_resources_are_drawn(lm_compare: Path) -> None:
    names = sorted(p.name for p in (lm_compare / "plots").glob("*.png"))
    assert "loss-iid.png" in names and "rouge-l-vs-resources-iid.png" in names
    assert not any(n.startswith("accuracy") for n in names)
