"""The embedded engine end to end on tiny models: files, metrics, determinism, adapter export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import crash_after, peft_test_accuracy, tiny_overrides

from fedhello.cli import main
from fedhello.store.rerun import without_machine
from fedhello.store.runs import RunDir

ROUND_KEYS = {"round", "test_accuracy", "test_macro_f1", "train_loss", "coverage", "clients"}
CLIENT_KEYS = {"client", "budget", "layers", "num_examples", "seconds", "peak_memory_mb",
               "bytes_up", "bytes_down"}  # fmt: skip


def run(out: Path, overrides: list[str], *extra: str) -> int:
    args = ["run", "--out", str(out)]
    for o in overrides:
        args += ["--set", o]
    return main([*args, *extra])


def test_run_directory_explains_itself(text_run: Path) -> None:
    run = RunDir(text_run)
    assert run.config_path.is_file() and run.summary_path.is_file()
    records = run.read_metrics()
    assert [r["round"] for r in records] == [1, 2, 3]
    for r in records:
        assert set(r) >= ROUND_KEYS
        assert len(r["coverage"]) == 4 and len(r["clients"]) == 3
        for c in r["clients"]:
            assert set(c) >= CLIENT_KEYS
            assert len(c["layers"]) == c["budget"]  # fedra: exactly the budget
            assert c["bytes_up"] < c["bytes_down"] or len(c["layers"]) == 4
        assert r["coverage"] == [sum(i in c["layers"] for c in r["clients"]) for i in range(4)]
    summary = run.read_summary()
    assert {"test_accuracy", "test_macro_f1", "wall_seconds"} <= set(summary)
    assert summary["test_examples"] == 60  # 10% of 600, the whole test split
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    targets = json.loads((run.adapter_dir / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(targets, str) or targets == sorted(targets)  # not in hashing's order


def test_the_tiny_model_learns(text_run: Path) -> None:
    records = RunDir(text_run).read_metrics()
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.05
    assert RunDir(text_run).read_summary()["test_accuracy"] > 0.4  # 4 balanced classes


def test_adapter_reloads_with_peft_and_reproduces_test_accuracy(
    text_run: Path, tiny_bert_dir: Path
) -> None:
    accuracy = peft_test_accuracy(text_run, tiny_bert_dir)
    assert accuracy == pytest.approx(RunDir(text_run).read_summary()["test_accuracy"])


def test_same_seed_same_metrics_other_seed_differs(
    text_run: Path, tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    common = {"data__text_column": '"sentence"', "data__label_column": '"topic"',
              "federation__rounds": 3, "train__local_steps": 15, "train__lr": 0.02,
              "data__partition": "iid", "train__precision": '"bf16"'}  # fmt: skip
    assert run(tmp_path / "again", tiny_overrides(tiny_bert_dir, tiny_text_csv, **common)) == 0
    first = [without_machine(r) for r in RunDir(text_run).read_metrics()]
    again = [without_machine(r) for r in RunDir(tmp_path / "again").read_metrics()]
    assert first == again
    other = tiny_overrides(tiny_bert_dir, tiny_text_csv, run__seed=1, **common)
    assert run(tmp_path / "other", other) == 0
    assert [without_machine(r) for r in RunDir(tmp_path / "other").read_metrics()] != first


def test_existing_run_directory_is_not_overwritten(
    text_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (text_run / "metrics.jsonl").read_bytes()
    assert run(text_run, []) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert "--resume" not in err  # a finished run: nothing to continue
    assert (text_run / "metrics.jsonl").read_bytes() == before


def test_an_interrupted_run_directory_is_refused_with_the_command_that_continues_it(
    text_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crashed = crash_after(text_run, tmp_path / "crashed", 1)
    done = len(RunDir(crashed).read_metrics())
    assert run(crashed, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"unfinished run ({done} rounds recorded)" in err
    assert f"fedhello run --resume {crashed}," in err and "--overwrite" in err
    assert main(["run", "--resume", str(crashed)]) == 0  # the hint works as written


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    assert run(tmp_path, [], "--overwrite") == 2
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_vit_image_federation_with_full_allocation(
    tmp_path: Path, tiny_vit_dir: Path, tiny_image_dir: Path
) -> None:
    ov = tiny_overrides(tiny_vit_dir, tiny_image_dir, allocation__strategy="full")
    assert run(tmp_path / "vit", ov) == 0
    records = RunDir(tmp_path / "vit").read_metrics()
    assert all(r["coverage"] == [3, 3, 3] for r in records)  # 3 clients x all 3 layers
    summary = RunDir(tmp_path / "vit").read_summary()
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["num_classes"] == 3


@pytest.mark.parametrize(
    "override,words",
    [
        ('model.name="/no/such/model"', ["model.name", "does not exist"]),
        ('model.name="bert-base-uncased"', ["hub downloads are off", "allow_download"]),
        ("clients.budgets=[1,1,1,9,9,9]", ["clients.budgets", "allowed: 1..4"]),
    ],
)
def test_bad_model_or_budget_is_one_line_before_any_work(
    override: str, words: list[str], tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    ov = [*tiny_overrides(tiny_bert_dir, tiny_text_csv), override]
    assert run(tmp_path / "bad", ov) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for w in words:
        assert w in err


def test_model_folder_without_config(
    tmp_path: Path, tiny_text_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m").mkdir()
    ov = tiny_overrides(tmp_path / "m", tiny_text_csv)
    assert run(tmp_path / "bad", ov) == 2
    assert "no config.json" in capsys.readouterr().err


def test_eval_subset_is_labelled(text_run: Path) -> None:
    r = RunDir(text_run).read_metrics()[0]
    assert r["eval_examples"] == 50 and r["eval_subset"] is True
    assert np.isfinite(r["val_accuracy"])


@pytest.mark.parametrize(
    "strategy",
    ["exclusive", "straggler", "fedra", "geometric", "randomized-geometric", "fisher", "fed-hello"],
)
def test_every_strategy_runs_on_the_default_data(
    strategy: str, tmp_path: Path, tiny_bert_dir: Path
) -> None:
    ov = tiny_overrides(
        tiny_bert_dir, "wordnet-nouns", data__max_train_examples=400, data__test_fraction=0.01,
        allocation__strategy=f'"{strategy}"', allocation__fisher_warmup=0,
        allocation__fisher_every=1, clients__tiers="[0.5, 1.0]",
    )  # fmt: skip
    assert run(tmp_path / strategy, ov) == 0
    records = RunDir(tmp_path / strategy).read_metrics()
    budgets = {c["client"]: c["budget"] for r in records for c in r["clients"]}
    assert set(budgets.values()) <= {2, 4}
    for r in records:
        assert r["allocation"] and len(r["coverage"]) == 4
        if strategy in ("fisher", "fed-hello"):
            assert len(r["layer_scores"]) == 4 and all(s >= 0 for s in r["layer_scores"])
            assert sum(r["layer_probabilities"]) == pytest.approx(1.0)
        if strategy == "exclusive":  # only the full-budget clients train
            assert all(c["budget"] == 4 for c in r["clients"])


@pytest.mark.parametrize("kind", ["nan", "outside", "loss", "work"])
def test_bad_client_update_is_rejected_counted_and_the_round_goes_on(
    kind: str, tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import fedhello.engine.embedded as sim

    real = sim.train_client
    victims: list[int] = []

    def faulty(model, layer_of, shard, task, global_state, *rest):
        result = real(model, layer_of, shard, task, global_state, *rest)
        u = result.update
        round_ = task.round
        if round_ not in victims:  # the first client of each round goes bad
            victims.append(round_)
            key = next(k for k in u.tensors if "lora_B" in k)
            if kind == "nan":
                u.tensors = {**u.tensors, key: np.full_like(u.tensors[key], np.nan)}
            elif kind == "outside":
                missing = next(i for i in range(4) if i not in u.layers)
                extra = next(k for k in global_state if f"layer.{missing}." in k)
                u.tensors = {**u.tensors, extra: global_state[extra]}
            elif kind == "work":  # claims ten times the work it was asked (and did)
                u.examples_seen *= 10
            else:
                u.train_loss = float("inf")
        return result

    monkeypatch.setattr(sim, "train_client", faulty)
    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', clients__tiers="[0.5]")  # fmt: skip
    assert run(tmp_path / kind, ov) == 0
    records = RunDir(tmp_path / kind).read_metrics()
    for r in records:
        assert r["num_rejected"] == 1 and len(r["rejected"]) == 1
        rejected = [c for c in r["clients"] if not c["accepted"]]
        assert len(rejected) == 1 and rejected[0]["rejected_reason"]
        reason = {"nan": "non-finite values", "outside": "outside the allocation",
                  "loss": "training loss is inf",
                  "work": "examples_seen = 160: the round asked 2 steps of 8 examples = 16",
                  }[kind]  # fmt: skip
        assert reason in rejected[0]["rejected_reason"], rejected[0]["rejected_reason"]
        good = [c for c in r["clients"] if c["accepted"]]
        # its layers did not count: coverage is that of the accepted clients alone
        assert r["coverage"] == [sum(i in c["layers"] for c in good) for i in range(4)]
        assert r["coverage"] != [sum(i in c["layers"] for c in r["clients"]) for i in range(4)]
    assert RunDir(tmp_path / kind).read_summary()["rejected_updates"] == 2


def _csv(tmp_path: Path, rows: int, columns: dict[str, str]) -> Path:
    import pandas as pd
    from conftest import make_texts

    texts, labels = make_texts(rows)
    path = tmp_path / "d.csv"
    pd.DataFrame({columns["text"]: texts, columns["label"]: labels}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "rows,columns,extra,words",
    [
        (100, {"text": "body", "label": "label"}, [], ["data.text_column = 'text'", "body, label"]),
        (100, {"text": "text", "label": "y"}, [], ["data.label_column = 'label'", "text, y"]),
        (6, {"text": "text", "label": "label"}, ["allocation.proxy_examples=1"],
         ["fewer than clients.num_clients = 6"]),
    ],
)  # fmt: skip
def test_bad_dataset_is_one_line_exit_2_and_leaves_nothing(
    rows: int, columns: dict[str, str], extra: list[str], words: list[str], tmp_path: Path,
    tiny_bert_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    ov = [*tiny_overrides(tiny_bert_dir, _csv(tmp_path, rows, columns)), *extra]
    assert run(tmp_path / "run", ov) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "run").exists()
    missing = [*tiny_overrides(tiny_bert_dir, tmp_path / "nope.csv")]
    assert run(tmp_path / "run", missing) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_front_door_runs_without_touching_process_state(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """fedhello.run: same result as the CLI, and the caller's environment, torch threads and
    logging handlers are as they were (run.threads applies for the call only)."""
    import logging
    import os

    import sklearn  # noqa: F401  # sets KMP_* variables when first imported: not our change
    import torch

    import fedhello

    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', run__threads=1)  # fmt: skip
    env, threads = dict(os.environ), torch.get_num_threads()
    handlers = list(logging.getLogger().handlers)
    summary = fedhello.run(fedhello.load_config(None, ov), out=tmp_path / "lib")
    assert dict(os.environ) == env and torch.get_num_threads() == threads
    assert logging.getLogger().handlers == handlers
    assert summary == RunDir(tmp_path / "lib").read_summary()
    assert run(tmp_path / "cli", ov) == 0
    lib = [without_machine(r) for r in RunDir(tmp_path / "lib").read_metrics()]
    assert lib == [without_machine(r) for r in RunDir(tmp_path / "cli").read_metrics()]
    with pytest.raises(fedhello.UserError, match="engine = 'gpu'; allowed: embedded"):
        fedhello.run(fedhello.load_config(None, ov), out=tmp_path / "x", engine="gpu")
    with pytest.raises(fedhello.UserError, match="already exists"):
        fedhello.run(fedhello.load_config(None, ov), out=tmp_path / "lib")


def test_a_round_with_fewer_valid_updates_than_min_replies_leaves_the_model(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``federation.min_replies`` counts valid updates: 3 replies of which 1 is rejected are
    2, below 3, and the model does not move (its LoRA B factors stay at their zeros)."""
    from safetensors.numpy import load_file

    import fedhello.engine.embedded as sim

    real = sim.train_client
    seen: set[int] = set()

    def one_bad(model, layer_of, shard, task, global_state, *rest):
        result = real(model, layer_of, shard, task, global_state, *rest)
        if task.round not in seen:
            seen.add(task.round)
            result.update.train_loss = float("nan")
        return result

    monkeypatch.setattr(sim, "train_client", one_bad)
    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', federation__min_replies=3)  # fmt: skip
    assert run(tmp_path / "short", ov) == 0
    records = RunDir(tmp_path / "short").read_metrics()
    assert all(r["below_min_replies"] and r["num_rejected"] == 1 for r in records)
    adapter = load_file(str(tmp_path / "short" / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in adapter.items() if "lora_B" in k]
    assert b and all(not v.any() for v in b)
    # with 2 required, the same rounds move it
    ov[-1] = "federation.min_replies=2"
    assert run(tmp_path / "enough", ov) == 0
    assert not any("below_min_replies" in r for r in RunDir(tmp_path / "enough").read_metrics())
    adapter = load_file(str(tmp_path / "enough" / "adapter" / "adapter_model.safetensors"))
    assert any(v.any() for k, v in adapter.items() if "lora_B" in k)


def test_a_fisher_strategy_that_never_scores_says_so(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', allocation__strategy='"fed-hello"',
                        allocation__fisher_warmup=2)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fedhello"):
        assert run(tmp_path / "r", ov) == 0  # 2 rounds, warm-up 2: no refresh
    assert "fed-hello never scores its layers: federation.rounds = 2" in caplog.text
    records = RunDir(tmp_path / "r").read_metrics()
    assert all(r["layer_scores"] is None for r in records)
