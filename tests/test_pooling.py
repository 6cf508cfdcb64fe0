"""The classifier reads its encoder through the pooling the model declares (or the masked mean
where its head would read a never-trained pooler): the pooled heads against hand computations,
the rule on folders that declare, lack or train a pooler, and the legacy reading."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedhello.core.errors import ModelError
from fedhello.model.loading import load_model
from fedhello.model.pooled import PooledForMultipleChoice, PooledForSequenceClassification, pool

LABELS = ["a", "b", "c"]


def _hidden_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    return hidden, mask


def test_mean_pooling_is_the_masked_mean() -> None:
    hidden, mask = _hidden_and_mask()
    h, m = hidden.numpy().astype(np.float64), mask.numpy()
    want = np.stack([h[i, : m[i].sum()].mean(axis=0) for i in range(3)])  # real tokens only
    np.testing.assert_allclose(pool(hidden, mask, "mean").numpy(), want, rtol=1e-6, atol=1e-6)
    want_max = np.stack([h[i, : m[i].sum()].max(axis=0) for i in range(3)])
    np.testing.assert_allclose(pool(hidden, mask, "max").numpy(), want_max, rtol=1e-6)
    np.testing.assert_array_equal(pool(hidden, mask, "cls").numpy(), hidden[:, 0].numpy())
    with pytest.raises(ValueError, match="allowed: mean, cls, max"):
        pool(hidden, mask, "weighted")


def test_the_pooled_classifier_is_a_linear_map_of_the_encoders_mean(tiny_bert_dir: Path) -> None:
    """Logits = W mean(h over the mask) + b, from the encoder's own token states; padding
    changes nothing; the loss is the cross-entropy of those logits."""
    from transformers import AutoModel, AutoTokenizer

    model = PooledForSequenceClassification.from_encoder(str(tiny_bert_dir), "mean", LABELS)
    model.eval()
    assert model.encoder.pooler is None  # no untrained layer in front of the head
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = tok(["a dog", "a much longer sentence about a cat"], padding=True, return_tensors="pt")
    labels = torch.tensor([0, 2])
    with torch.inference_mode():
        out = model(**batch, labels=labels)
        states = AutoModel.from_pretrained(tiny_bert_dir)(**batch).last_hidden_state
    m = batch["attention_mask"].numpy()
    pooled = np.stack([states[i, : m[i].sum()].numpy().mean(axis=0) for i in range(2)])
    w, b = model.classifier.weight.detach().numpy(), model.classifier.bias.detach().numpy()
    logits = pooled @ w.T + b
    np.testing.assert_allclose(out.logits.numpy(), logits, rtol=1e-4, atol=1e-5)
    z = logits - logits.max(axis=1, keepdims=True)
    ce = -(z[[0, 1], [0, 2]] - np.log(np.exp(z).sum(axis=1))).mean()
    assert float(out.loss) == pytest.approx(ce, rel=1e-4)
    with torch.inference_mode():  # the first text alone (no padding): the same logits
        alone = model(**tok(["a dog"], return_tensors="pt")).logits
    torch.testing.assert_close(alone[0], out.logits[0], rtol=1e-4, atol=1e-5)


def test_multiple_choice_scores_each_pair_from_its_pooling(tiny_bert_dir: Path) -> None:
    model = PooledForMultipleChoice.from_encoder(str(tiny_bert_dir), "mean", ["0", "1", "2"])
    model.eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (2, 3, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[:, :, 4:] = 0
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
        one = model(input_ids=ids[1:, 2:3], attention_mask=mask[1:, 2:3]).logits
    assert logits.shape == (2, 3)
    torch.testing.assert_close(one[0, 0], logits[1, 2], rtol=1e-4, atol=1e-5)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _declare(folder: Path, mode: str) -> None:
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
    ]))  # fmt: skip
    (folder / "1_Pooling").mkdir()
    modes = {f"pooling_mode_{k}": k == mode for k in ("cls_token", "mean_tokens", "max_tokens")}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(modes))


def _train_pooler(folder: Path) -> None:
    """Give the checkpoint's pooler a non-zero bias, as a trained pooler has (BERT-base's)."""
    from transformers import BertModel

    model = BertModel.from_pretrained(folder)
    with torch.no_grad():
        model.pooler.dense.bias.fill_(0.1)
    model.save_pretrained(folder)


def test_the_rule(
    tiny_bert_dir: Path, tiny_vit_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedhello")
    # 1. an untrained pooler, no declaration: the masked mean, and the log says why
    loaded = load_model(str(tiny_bert_dir), LABELS)
    assert loaded.pooling == "mean" and "never trained" in loaded.pooling_reason
    assert isinstance(loaded.model, PooledForSequenceClassification)
    assert "mean pooling (no pooling declared" in caplog.text
    # 2. a declared pooling wins (here cls, to tell it from the fallback)
    declared = _copy(tiny_bert_dir, tmp_path / "declared")
    _declare(declared, "cls_token")
    loaded = load_model(str(declared), LABELS)
    assert (loaded.pooling, loaded.pooling_reason) == ("cls", "declared by the model")
    # 3. a trained pooler and no declaration: transformers' own head, as built
    trained = _copy(tiny_bert_dir, tmp_path / "trained")
    _train_pooler(trained)
    loaded = load_model(str(trained), LABELS)
    assert loaded.pooling == "head"
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    # 4. asked for: the head as built, with a warning that its pooler is untrained
    caplog.clear()
    loaded = load_model(str(tiny_bert_dir), LABELS, pooling="head")
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert "reads a pooler that was never trained" in caplog.text
    assert load_model(str(declared), LABELS, pooling="max").pooling == "max"
    # 5. images: ViT's head reads its class token itself; no pooled head to ask for
    assert load_model(str(tiny_vit_dir), LABELS).pooling == "head"
    with pytest.raises(ModelError, match=r"model\.pooling = 'mean': image has no pooled head"):
        load_model(str(tiny_vit_dir), LABELS, pooling="mean")


def test_a_hub_model_is_read_with_the_pooling_it_declares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id (downloads on) is read as its local copy would be: its two small files are
    fetched from the hub (here a stand-in serving a folder: the tests never touch the network)."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from fedhello.model.pooling import declared_pooling

    served = tmp_path / "hub"
    served.mkdir()
    _declare(served, "mean_tokens")
    asked: list[tuple[str, str]] = []

    def download(repo_id: str, filename: str, **kwargs: object) -> str:
        asked.append((repo_id, filename))
        if not (served / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(served / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.chdir(tmp_path)  # no folder named like the hub id
    assert declared_pooling("org/encoder", hub=True) == "mean"
    assert [f for _, f in asked] == ["modules.json", "1_Pooling/config.json"]
    assert {r for r, _ in asked} == {"org/encoder"}
    assert declared_pooling("org/encoder") is None  # downloads off: only a folder is read
    (served / "modules.json").unlink()
    assert declared_pooling("org/encoder", hub=True) is None  # declares none: the rule goes on

    def offline(repo_id: str, filename: str, **kwargs: object) -> str:
        raise LocalEntryNotFoundError("not cached")

    # no answer is not "no declaration": the same config must not load another pooling
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelError, match=r"model.name = 'org/encoder': cannot read modules"):
        declared_pooling("org/encoder", hub=True)


def test_minilm_declares_mean_pooling() -> None:
    """The default model, all-MiniLM-L6-v2, is read as it was trained: the mean of its tokens
    (its checkpoint's pooler.dense, bias exactly 0, is never read)."""
    from fedhello.model.pooling import declared_pooling
    from fedhello.model.source import resolve_model_source

    source = resolve_model_source("minilm-l6", False)
    assert declared_pooling(source) == "mean"
    from safetensors import safe_open

    with safe_open(str(Path(source) / "model.safetensors"), "pt") as f:
        assert not f.get_tensor("pooler.dense.bias").any()  # the defect this rule avoids


def test_a_runs_own_config_reads_as_transformers_head(tmp_path: Path) -> None:
    """A run made before ``model.pooling`` existed reruns as it was made: head."""
    from fedhello.core.config import load_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('[model]\nname = "minilm-l6"\n')
    (run / "metrics.jsonl").write_text("")
    assert load_config(run / "config.toml").model.pooling == "head"
    assert load_config(None).model.pooling == "auto"
