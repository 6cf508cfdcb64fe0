"""FedNCM's round 0 kept in a folder (``--cache-dir``): reused bit for bit by a later process
with the same fingerprint, recomputed when anything it reads differs or the file is damaged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_overrides

from fedhello.cli import main
from fedhello.store.rerun import without_machine
from fedhello.store.runs import RunDir


def _args(tiny_bert_dir: Path, tiny_text_csv: Path, *extra: str) -> list[str]:
    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', train__head='"class-means"')  # fmt: skip
    args = list(extra)
    for o in ov:
        args += ["--set", o]
    return args


def test_a_kept_round_zero_is_reused_by_a_later_process_and_changes_no_metric(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, counted_class_sums: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A comparison keeps its round 0 in the folder; a later run of one of its cells reads it
    instead of computing it, and writes the metrics the comparison's run wrote; another seed
    (other shards, another initial state) computes its own."""
    cache = tmp_path / "cache"
    root = tmp_path / "c"
    assert main(["compare", *_args(tiny_bert_dir, tiny_text_csv), "--strategies", "fedra",
                 "--seeds", "0", "--partitions", "iid", "--out", str(root),
                 "--cache-dir", str(cache)]) == 0  # fmt: skip
    assert counted_class_sums == [0, 1, 2, 3, 4, 5, 0]  # fedra's six clients, the reference's one
    assert len(list(cache.glob("round0-*.safetensors"))) == 2  # fedra's and the reference's
    cell = RunDir(root / "runs" / "iid" / "fedra" / "seed0")
    again = tmp_path / "again"
    with caplog.at_level(logging.INFO, logger="fedhello.engine.embedded"):
        assert main(["run", str(cell.config_path), "--out", str(again),
                     "--cache-dir", str(cache)]) == 0  # fmt: skip
    assert counted_class_sums == [0, 1, 2, 3, 4, 5, 0]  # nothing computed: read from the folder
    assert "class sums kept in" in caplog.text
    assert without_machine(RunDir(again).read_metrics()) == without_machine(cell.read_metrics())

    other = tmp_path / "seed1"
    assert main(["run", str(cell.config_path), "--set", "run.seed=1", "--out", str(other),
                 "--cache-dir", str(cache)]) == 0  # fmt: skip
    assert counted_class_sums[7:] == [0, 1, 2, 3, 4, 5]  # another fingerprint: computed
    assert len(list(cache.glob("round0-*.safetensors"))) == 3


def test_a_damaged_kept_round_zero_is_computed_again_and_rewritten(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, counted_class_sums: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    cache = tmp_path / "cache"
    first = tmp_path / "first"
    args = _args(tiny_bert_dir, tiny_text_csv, "--cache-dir", str(cache))
    assert main(["run", *args, "--out", str(first)]) == 0
    (kept,) = cache.glob("round0-*.safetensors")
    kept.write_bytes(kept.read_bytes()[:100])  # a truncated file (a disk full, a killed copy)
    second = tmp_path / "second"
    with caplog.at_level(logging.WARNING):
        assert main(["run", *args, "--out", str(second)]) == 0
    assert "cannot be reused" in caplog.text
    assert counted_class_sums == [0, 1, 2, 3, 4, 5] * 2
    assert without_machine(RunDir(second).read_metrics()) == without_machine(
        RunDir(first).read_metrics()
    )
    third = tmp_path / "third"
    assert main(["run", *args, "--out", str(third)]) == 0  # the rewritten file is whole
    assert counted_class_sums == [0, 1, 2, 3, 4, 5] * 2


def test_a_kept_round_zero_is_not_reused_under_another_thread_count(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, counted_class_sums: list[int]
) -> None:
    """The CPU's sums depend on how many threads split them: part of the fingerprint."""
    cache = tmp_path / "cache"
    args = _args(tiny_bert_dir, tiny_text_csv, "--cache-dir", str(cache))
    assert main(["run", *args, "--set", "run.threads=1", "--out", str(tmp_path / "a")]) == 0
    assert main(["run", *args, "--set", "run.threads=2", "--out", str(tmp_path / "b")]) == 0
    assert counted_class_sums == [0, 1, 2, 3, 4, 5] * 2
    assert len(list(cache.glob("round0-*.safetensors"))) == 2


def test_cache_dir_bad_input_is_one_line(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "f"
    a_file.write_text("x")
    args = _args(tiny_bert_dir, tiny_text_csv, "--out", str(tmp_path / "r"))
    assert main(["run", *args, "--cache-dir", str(a_file)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err and str(a_file) in err
    assert main(["run", *args, "--cache-dir", str(tmp_path / "d"), "--engine", "flower-sim"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "allowed: engine 'embedded'" in err
    assert main(["run", *args, "--cache-dir", ""]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "names no folder" in err
    assert not (tmp_path / "r").exists()


def test_the_fingerprint_changes_with_anything_round_zero_reads(
    tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """Two builds of one experiment agree; one ulp in a frozen base weight, one token of an
    example a client sums, a non-persistent buffer (BERT's position ids, outside state_dict)
    or the model's config each change the fingerprint."""
    import numpy as np
    import torch

    from fedhello.core.config import load_config
    from fedhello.engine.experiment import build_experiment
    from fedhello.engine.round_zero import round_zero_key

    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', train__head='"class-means"')  # fmt: skip
    exp = build_experiment(load_config(None, ov))
    key = round_zero_key(exp, exp.init_state)
    assert round_zero_key(build_experiment(load_config(None, ov)), exp.init_state) == key

    frozen = next(p for _, p in exp.model.named_parameters() if not p.requires_grad)
    with torch.no_grad():
        old = frozen.view(-1)[0].item()
        frozen.view(-1)[0] = float(np.nextafter(np.float32(old), np.float32(np.inf)))
        assert round_zero_key(exp, exp.init_state) != key
        frozen.view(-1)[0] = old
    assert round_zero_key(exp, exp.init_state) == key

    ids = exp.encoded.features["input_ids"]  # type: ignore[attr-defined]
    row = int(exp.shards[0][0])
    ids[row, 1] += 1
    assert round_zero_key(exp, exp.init_state) != key
    ids[row, 1] -= 1

    persistent = dict(exp.model.state_dict())
    name, buffer = next((n, b) for n, b in exp.model.named_buffers() if n not in persistent)
    assert "position_ids" in name or "token_type_ids" in name
    buffer.add_(1)
    assert round_zero_key(exp, exp.init_state) != key
    buffer.sub_(1)

    config = exp.model.get_base_model().config
    config.layer_norm_eps *= 2
    assert round_zero_key(exp, exp.init_state) != key
    config.layer_norm_eps /= 2
    assert round_zero_key(exp, exp.init_state) == key


def test_a_folder_that_cannot_be_written_costs_the_reuse_not_the_run(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """safetensors raises its own error (not an OSError) on a full disk or a read-only
    folder: the run still finishes, and says why nothing was kept."""
    from safetensors import SafetensorError

    import fedhello.engine.round_zero as round_zero

    def failing(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError("Error while serializing: No space left on device")

    monkeypatch.setattr(round_zero, "save_file", failing)
    cache = tmp_path / "cache"
    args = _args(tiny_bert_dir, tiny_text_csv, "--cache-dir", str(cache))
    with caplog.at_level(logging.WARNING):
        assert main(["run", *args, "--out", str(tmp_path / "r")]) == 0
    assert "cannot keep the class sums" in caplog.text
    assert not list(cache.glob("*"))  # no temporary file left behind
    assert RunDir(tmp_path / "r").summary_path.is_file()


_KEY_SCRIPT = """
import sys
from fedhello.core.config import load_config
from fedhello.engine.experiment import build_experiment
from fedhello.engine.round_zero import round_zero_key
exp = build_experiment(load_config(None, sys.argv[1:]))
print(sorted(exp.model.peft_config["default"].target_modules), round_zero_key(exp, exp.init_state))
"""


def test_the_fingerprint_is_the_same_in_every_process(
    tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """Two processes whose string hashing differs (``PYTHONHASHSEED`` 0 and 1 iterate the
    set {"query", "value"} in opposite orders) fingerprint one round 0 alike, so the second
    reuses the first's sums: PEFT keeps the adapter's target modules as a set, and its ``str``
    followed the process's hashing."""
    import os
    import subprocess
    import sys

    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', train__head='"class-means"')  # fmt: skip
    orders, keys = [], []
    for hash_seed in ("0", "1"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        set_order = subprocess.run(
            [sys.executable, "-c", "print(str({'query', 'value'}))"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        out = subprocess.run([sys.executable, "-c", _KEY_SCRIPT, *ov], env=env,
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        orders.append(set_order)
        keys.append(out[-1])
        assert "'query'," in out[0] and "'value']" in out[1]  # the set the fingerprint reads
    assert orders[0] != orders[1]  # the two processes do iterate the set differently
    assert keys[0] == keys[1]
