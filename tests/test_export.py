"""`fedhello export RUN --merged OUT`: a transformers model that predicts what the run's PEFT
adapter predicts (a pooled classifier with its head's code, loaded by plain transformers with
``trust_remote_code``; transformers' own head as a stock class); unfinished runs and occupied
folders are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
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


def test_merged_pooled_model_predicts_what_the_adapter_predicts(
    text_run: Path, tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default head reads the mean of the token states (the tiny BERT's pooler is
    untrained); plain transformers loads the merged model with its pooling (remote code), and
    ``pipeline`` gives the adapter's logits."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, pipeline

    from fedhello.model.pooled import PooledForSequenceClassification

    out = tmp_path / "merged"
    assert main(["export", str(text_run), "--merged", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "AutoModelForSequenceClassification.from_pretrained" in printed
    assert "trust_remote_code=True" in printed
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in weights)  # no PEFT needed to load it
    card = (out / "README.md").read_text()  # the merged folder says what it is and how to load
    assert "AutoModelForSequenceClassification.from_pretrained(" in card
    assert "trust_remote_code=True" in card and text_run.name in card
    assert not any("pooler" in k for k in weights)  # nothing untrained in front of the head
    # the run trained in bf16; its adapter and the merged model are fp32
    summary = RunDir(text_run).read_summary()
    assert summary["precision"] == "bf16" and summary["pooling"] == "mean"
    adapter = load_file(str(text_run / "adapter" / "adapter_model.safetensors"))
    assert {v.dtype for v in adapter.values()} == {np.dtype(np.float32)}
    assert {v.dtype for v in weights.values() if v.dtype.kind == "f"} == {np.dtype(np.float32)}
    labels = json.loads((text_run / "adapter" / "labels.json").read_text())

    merged = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    merged.eval()
    assert [merged.config.id2label[i] for i in range(len(labels))] == labels
    # a user with only the adapter: the pooled base named in its fedhello.json, then PEFT
    note = json.loads((text_run / "adapter" / "fedhello.json").read_text())
    assert note["pooling"] == "mean"
    assert (text_run / "adapter" / "modeling_fedhello_pooled.py").is_file()
    base = PooledForSequenceClassification.from_encoder(str(tiny_bert_dir), "mean", labels)
    peft = PeftModel.from_pretrained(base, str(text_run / "adapter")).eval()
    batch, y = _test_batch(text_run, out)  # the tokenizer saved beside the model
    with torch.inference_mode():
        a, b = merged(**batch).logits, peft(**batch).logits
    assert torch.allclose(a, b, atol=1e-5)
    accuracy = float((a.argmax(-1).numpy() == y).mean())
    # the run scored itself in bf16, the export scores in fp32: a rounding may flip an example
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=0.05)

    # pipeline on the merged folder: the adapter's logits, per class name
    from fedhello.core.config import load_config
    from fedhello.data.loading import load_raw
    from fedhello.tasks import task_for

    cfg = load_config(text_run / "config.toml")
    raw = load_raw(cfg.data, task_for("text"), False)
    texts = [raw.inputs[i] for i in raw.splits["test"][:4]]
    classify = pipeline("text-classification", model=str(out), trust_remote_code=True,
                        top_k=None, function_to_apply="none")  # fmt: skip
    for text, scores in zip(texts, classify(texts), strict=True):
        tok = batch_of(out, text, cfg.model.max_length)
        with torch.inference_mode():
            want = peft(**tok).logits[0]
        got = torch.tensor([next(s["score"] for s in scores if s["label"] == n) for n in labels])
        assert torch.allclose(got, want, atol=1e-4)

    # the merge changed the encoder's weights (a no-op export would equal the base model)
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(tiny_bert_dir)
    key = "encoder.layer.0.attention.self.query.weight"
    merged_key = f"encoder.{key}"
    assert not torch.allclose(torch.from_numpy(weights[merged_key]), plain.state_dict()[key])


def batch_of(folder: Path, text: str, max_length: int) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return dict(tok([text], truncation=True, max_length=max_length, return_tensors="pt"))


def batch_of_texts(folder: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return dict(tok(texts, padding=True, return_tensors="pt"))


def test_a_head_run_exports_a_stock_class(
    tiny_bert_dir: Path, tiny_text_csv: Path, tmp_path: Path
) -> None:
    """``model.pooling = "head"`` (how runs before pooling were made) exports a stock
    BertForSequenceClassification that loads without remote code; its adapter loads onto the
    stock class, as its card says."""
    from transformers import AutoModelForSequenceClassification

    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', federation__rounds=1,
                        model__pooling='"head"', train__precision='"fp32"')  # fmt: skip
    run = tmp_path / "run"
    assert main(["run", "--out", str(run), *[a for o in ov for a in ("--set", o)]]) == 0
    assert RunDir(run).read_summary()["pooling"] == "head"
    # the stock route is right for it: PEFT's suffix list stays, and the card's code (stock
    # class, then PEFT) gives the merged model's logits
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["query", "value"]
    card = (run / "adapter" / "README.md").read_text()
    assert "PooledFor" not in card and "Warning" not in card
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merged", str(out)]) == 0
    assert not (out / "modeling_fedhello_pooled.py").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(merged).__name__ == "BertForSequenceClassification"
    from test_adapter_folder import TEXTS, logits_printer, python_block, run_snippet

    from fedhello.model.model_card import ADAPTER_PLACEHOLDER

    code = python_block(card).replace(ADAPTER_PLACEHOLDER, str(run / "adapter"))
    got = run_snippet(code + logits_printer("model", "tokenizer"), tmp_path, [])
    with torch.inference_mode():
        want = merged(**dict(batch_of_texts(out, TEXTS))).logits
    assert torch.allclose(got, want, atol=1e-5)


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
