"""`fedhello export RUN --merged OUT`: a plain transformers model that predicts what the run's
PEFT adapter predicts; unfinished runs and occupied folders are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fedhello.cli import main
from fedhello.store.runs import RunDir


def _test_batch(run: Path, tokenizer_dir: Path) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    from transformers import AutoTokenizer

    from fedhello.core.config import load_config
    from fedhello.data.loading import load_raw
    from fedhello.tasks import task_for

    cfg = load_config(run / "config.toml")
    raw = load_raw(cfg.data, task_for("text"), False)
    test = raw.splits["test"]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = tok([raw.inputs[i] for i in test], padding=True, truncation=True,
                max_length=cfg.model.max_length, return_tensors="pt")  # fmt: skip
    return dict(batch), raw.labels[test]


def test_merged_model_predicts_what_the_adapter_predicts(
    text_run: Path, tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "merged"
    assert main(["export", str(text_run), "--merged", str(out)]) == 0
    assert "AutoModelForSequenceClassification.from_pretrained" in capsys.readouterr().out
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in weights)  # a plain model: no PEFT needed to load it
    # the run trained in bf16; its adapter and the merged model are fp32
    assert RunDir(text_run).read_summary()["precision"] == "bf16"
    adapter = load_file(str(text_run / "adapter" / "adapter_model.safetensors"))
    assert {v.dtype for v in adapter.values()} == {np.dtype(np.float32)}
    assert {v.dtype for v in weights.values() if v.dtype.kind == "f"} == {np.dtype(np.float32)}
    labels = json.loads((text_run / "adapter" / "labels.json").read_text())

    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert [merged.config.id2label[i] for i in range(len(labels))] == labels
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=len(labels))
    peft = PeftModel.from_pretrained(base, str(text_run / "adapter")).eval()
    batch, y = _test_batch(text_run, out)  # the tokenizer saved beside the model
    with torch.inference_mode():
        a, b = merged(**batch).logits, peft(**batch).logits
    assert torch.allclose(a, b, atol=1e-5)
    accuracy = float((a.argmax(-1).numpy() == y).mean())
    # the run scored itself in bf16, the export scores in fp32: a rounding may flip an example
    assert accuracy == pytest.approx(RunDir(text_run).read_summary()["test_accuracy"], abs=0.05)
    # the merge changed the base weights (a no-op export would equal the base model)
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(torch.from_numpy(weights[key]), plain.state_dict()[key])


def test_bad_exports_are_refused_in_one_line(
    text_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.toml").write_text((text_run / "config.toml").read_text())
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    cases = [
        ([str(tmp_path / "nope"), "--merged", str(tmp_path / "o1")], "does not exist"),
        (
            [str(unfinished), "--merged", str(tmp_path / "o2")],
            "has no adapter: it has not finished",
        ),
        ([str(text_run), "--merged", str(occupied)], "exists and is not empty"),
        ([str(text_run), "--merged", str(text_run / "m")], "is inside the run"),
    ]
    for args, expected in cases:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fedhello: error: ") and expected in err[0]
    assert (occupied / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
