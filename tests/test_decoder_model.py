"""Decoder LLMs on the model side: LoRA on the four attention projections of every block, no
trained head (the tied ``lm_head`` stays frozen), PEFT's causal-LM keys mapped to blocks 0..L-1,
backward stopping at the lowest trained block, FedRA's subnetwork on rotary and sliding-window
decoders, and the ``smollm2-135m`` registry name. Tiny random Llama and Qwen2 models built in
code; the real SmolLM2 only where ``make smollm2`` installed it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModelForCausalLM
from peft.tuners.lora import LoraLayer

from fedhello.core.errors import ModelError
from fedhello.core.layers import layer_of_keys
from fedhello.model.lora import (
    adapter_keys,
    apply_layer_mask,
    build_lora_model,
    get_state,
    head_modules,
    is_causal_lm,
    resolve_target_modules,
    set_state,
)
from fedhello.model.source import resolve_model_source, smollm2_dir
from fedhello.model.subnetwork import block_container, subnetwork

LAYERS = 4
VOCAB = 100
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# PEFT's causal-LM key, parsed here independently of fedhello.core.layers
KEY_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.lora_([AB])\.default\.weight$"
)


def _config(kind: str, **extra: object):
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, object] = {
        "vocab_size": VOCAB, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
    }  # fmt: skip
    if kind == "llama":  # tied, as SmolLM2
        return LlamaConfig(hidden_size=32, tie_word_embeddings=True, **common | extra)
    # untied; sliding-window attention on blocks 2 and 3 (window 3 tokens, shorter than a batch)
    return Qwen2Config(
        hidden_size=48, tie_word_embeddings=False, use_sliding_window=True, sliding_window=3,
        max_window_layers=2, **common | extra,
    )  # fmt: skip


def _causal_lm(kind: str, **extra: object):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(kind, **extra)).eval()


def _lora(kind: str, **extra: object):
    """The causal LM with LoRA r4 on ["auto"], B set non-zero so every factor has a gradient."""
    model = build_lora_model(_causal_lm(kind, **extra), 4, 8, 0.0, ["auto"])
    keys = adapter_keys(model)
    rng = np.random.default_rng(1)
    set_state(model, {k: rng.normal(0, 0.2, v.shape).astype(np.float32)
                      for k, v in get_state(model, keys).items()})  # fmt: skip
    return model, keys


def _batch(n: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _block_outputs(model: torch.nn.Module) -> tuple[dict[int, list[bool]], list]:
    """Forward hooks on the decoder blocks: block -> requires_grad of each of its outputs."""
    parent, attr = block_container(model, LAYERS)
    seen: dict[int, list[bool]] = {}
    handles = []
    for i, block in enumerate(getattr(parent, attr)):

        def hook(_m, _args, out, i=i) -> None:
            hidden = out[0] if isinstance(out, tuple) else out
            seen.setdefault(i, []).append(hidden.requires_grad)

        handles.append(block.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_auto_targets_are_the_four_attention_projections(kind: str) -> None:
    base = _causal_lm(kind)
    assert is_causal_lm(base)
    assert resolve_target_modules(base, ["auto"]) == list(PROJECTIONS)
    # the MLP only when named
    assert resolve_target_modules(base, ["gate_proj", "down_proj"]) == ["gate_proj", "down_proj"]
    model = build_lora_model(base, 4, 8, 0.0, ["auto"])
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    expected = {
        f"base_model.model.model.layers.{i}.self_attn.{p}"
        for i in range(LAYERS)
        for p in PROJECTIONS
    }
    assert wrapped == expected  # every block, no MLP, no lm_head


def test_classifiers_keep_their_query_value_pair_and_their_head() -> None:
    """A Llama with a classification head is no causal LM: today's pair and a trained head;
    a bare decoder stack (no head, no lm_head) is an error, not a headless LM."""
    from transformers import LlamaForSequenceClassification, LlamaModel

    torch.manual_seed(0)
    config = _config("llama", num_labels=3, pad_token_id=0)
    classifier = LlamaForSequenceClassification(config)
    assert not is_causal_lm(classifier)
    assert resolve_target_modules(classifier, ["auto"]) == ["q_proj", "v_proj"]
    assert head_modules(classifier) == ["score"]
    assert not is_causal_lm(LlamaModel(config))
    with pytest.raises(ValueError, match="no classification head"):
        head_modules(LlamaModel(config))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_adapter_keys_cover_every_block_and_no_head(kind: str) -> None:
    model, keys = _lora(kind)
    assert isinstance(model, PeftModelForCausalLM) and head_modules(model) == []
    assert not any(".modules_to_save." in n for n, _ in model.named_parameters())
    parsed = {k: KEY_RE.match(k) for k in keys}
    assert all(parsed.values()), [k for k, m in parsed.items() if m is None]
    layer_of = layer_of_keys(keys, LAYERS)
    assert layer_of == {k: int(m.group(1)) for k, m in parsed.items() if m}
    per_block = {i: sorted((m.group(2), m.group(3)) for k, m in parsed.items()
                           if m and int(m.group(1)) == i) for i in range(LAYERS)}  # fmt: skip
    assert all(v == sorted((p, f) for p in "qkvo" for f in "AB") for v in per_block.values())
    inner = model.get_base_model()
    lm_head, embed = inner.get_output_embeddings().weight, inner.get_input_embeddings().weight
    assert not lm_head.requires_grad and not embed.requires_grad
    assert (lm_head is embed) == (kind == "llama")  # tying survives PEFT
    # generate works through the PEFT wrapper, greedy, with the adapters
    out = model.generate(**{k: v[:1] for k, v in _batch().items() if k != "labels"},
                         max_new_tokens=3, do_sample=False)  # fmt: skip
    assert out.shape == (1, 8 + 3)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_backward_stops_at_the_lowest_trained_block(kind: str) -> None:
    model, keys = _lora(kind)
    layer_of = layer_of_keys(keys, LAYERS)
    params = apply_layer_mask(model, [2], layer_of)
    assert {layer_of[n] for n, p in model.named_parameters() if p.requires_grad} == {2}
    seen, handles = _block_outputs(model)
    model.train()
    model(**_batch()).loss.backward()
    for h in handles:
        h.remove()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (layer_of.get(name) == 2), name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # blocks 0 and 1 produce no autograd graph, so backward has nothing to run there
    assert seen == {0: [False], 1: [False], 2: [True], 3: [True]}
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    optimizer.step()
    assert len(optimizer.state) == len(params) == 8  # q, k, v, o; A and B


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_subnetwork_runs_only_its_blocks_and_is_the_smaller_model(kind: str) -> None:
    """Under ``subnetwork(model, [1, 3])`` only blocks 1 and 3 run, forward and backward, and
    (independent check) a 2-block model of the same config given blocks 1 and 3's weights
    computes the same logits: rotary positions, and for Qwen2 the sliding-window mask of block
    3 (blocks 2, 3 slide; 0, 1 do not)."""
    model, keys = _lora(kind)
    config = model.get_base_model().config
    kinds_before, cache_before = list(getattr(config, "layer_types", []) or []), config.use_cache
    layer_of = layer_of_keys(keys, LAYERS)
    batch = _batch(length=10)
    seen, handles = _block_outputs(model)
    params = apply_layer_mask(model, [1, 3], layer_of)
    model.train()
    with subnetwork(model, [1, 3], LAYERS):
        model(**batch).loss.backward()
    assert seen == {1: [True], 3: [True]}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (layer_of.get(name) in (1, 3)), name
    assert all(p.grad is not None for p in params)
    model.eval()
    with torch.no_grad(), subnetwork(model, [1, 3], LAYERS):
        sub = model(**batch).logits
    for h in handles:
        h.remove()
    # restored afterwards: blocks, layer kinds, cache setting
    parent, attr = block_container(model, LAYERS)
    assert len(getattr(parent, attr)) == LAYERS
    assert list(getattr(config, "layer_types", []) or []) == kinds_before
    assert config.use_cache == cache_before
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, sub)

    extra: dict[str, object] = {"num_hidden_layers": 2}
    if kind == "qwen2":
        assert kinds_before == ["full_attention"] * 2 + ["sliding_attention"] * 2
        extra["layer_types"] = ["full_attention", "sliding_attention"]
    small = build_lora_model(_causal_lm(kind, **extra), 4, 8, 0.0, ["auto"])
    source = model.state_dict()
    renamed = {}
    for name in small.state_dict():
        origin = re.sub(r"\.layers\.(\d+)\.", lambda m: f".layers.{(1, 3)[int(m[1])]}.", name)
        renamed[name] = source[origin]
    small.load_state_dict(renamed)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(**batch).logits, sub)


def test_smollm2_not_installed_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDHELLO_MODELS", str(tmp_path))
    assert smollm2_dir() == tmp_path / "SmolLM2-135M-Instruct"
    with pytest.raises(ModelError, match=r"smollm2-135m.*not installed.*run `make smollm2`") as err:
        resolve_model_source("smollm2-135m", allow_download=False)
    assert str(smollm2_dir()) in str(err.value) and "\n" not in str(err.value)
    smollm2_dir().mkdir()
    (smollm2_dir() / "config.json").write_text("{}")
    assert resolve_model_source("smollm2-135m", allow_download=False) == str(smollm2_dir())


@pytest.mark.slow
def test_smollm2_when_installed_answers_and_has_thirty_lora_blocks() -> None:
    """The folder ``make smollm2`` wrote: plain transformers loads it tied, greedy decoding
    through its chat template answers, and LoRA ["auto"] puts q/k/v/o on each of 30 blocks."""
    if not (smollm2_dir() / "config.json").is_file():
        pytest.skip(f"smollm2-135m is not installed ({smollm2_dir()}): run `make smollm2` once")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_source("smollm2-135m", allow_download=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    peft = build_lora_model(model, 4, 8, 0.0, ["auto"])
    with torch.no_grad():  # B starts at zero: the adapter does not change the answer yet
        out = peft.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    layer_of = layer_of_keys(adapter_keys(peft), 30)
    assert sorted(set(layer_of.values())) == list(range(30))
    assert len(layer_of) == 30 * 4 * 2
