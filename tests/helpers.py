"""Helpers the tests share that the library does not need: the slow reference for Fisher scores
and the decoder tests' helpers. (Equality of metrics, timing aside, is the library's:
``fedhello.store.rerun``.)"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedhello.core.layers import lora_factor
from fedhello.data.encoding import Encoded


def fisher_scores_loop(
    model: torch.nn.Module,
    data: Encoded,
    indices: np.ndarray,
    layer_of: Mapping[str, int | None],
    num_layers: int,
    factors: str = "AB",
) -> list[float]:
    """Reference: one backward pass per example, the gradients of the LoRA ``factors`` clients
    train (``"B"``: FFA-LoRA) squared. Slow; for tests and benchmarks. A multiple-choice example
    is one ``(1, choices, tokens)`` batch: its gradient sums over its choices by construction."""
    params = {
        n: p
        for n, p in model.named_parameters()
        if layer_of.get(n) is not None and (factors == "AB" or lora_factor(n) == "B")
    }
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    totals = np.zeros(num_layers, dtype=np.float64)
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in params)
        model.eval()
        for i in indices:
            batch = data.batch([i])
            labels = batch.pop("labels")
            loss = F.cross_entropy(model(**batch).logits, labels, reduction="sum")
            grads = torch.autograd.grad(loss, list(params.values()))
            for name, g in zip(params, grads, strict=True):
                totals[layer_of[name]] += float(g.pow(2).sum())  # type: ignore[index]
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
    return (totals / max(1, len(indices))).tolist()


# -- decoder language models: a word-level tokenizer with a chat template ----------------------

# ChatML, as SmolLM2 and Qwen write it (``<|im_start|>role\ncontent<|im_end|>\n``)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_SPECIALS = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]  # ids 0..3


def word_tokenizer(words: list[str], template: str = CHATML, eos: str = "<|im_end|>") -> Any:
    """A fast word-level tokenizer over ``words`` (whitespace and punctuation runs split them;
    special tokens first, so [PAD] = 0 and EOS ``<|im_end|>`` = 3; another ``eos`` comes
    after them) with a chat template: small enough for a tiny decoder's vocabulary, saved and
    loaded like any hub tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*CHAT_SPECIALS, eos, *words]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token=eos,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )  # fmt: skip
    tok.chat_template = template
    return tok


def greedy_answer(model: Any, tokenizer: Any, prompt: list[int], max_new_tokens: int) -> str:
    """Reference greedy decoding: the whole sequence re-run for every new token (no cache, no
    padding, no ``generate``), the argmax appended until EOS; special tokens dropped."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            ids.append(nxt)
    return str(tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True)).strip()


def response_nll(model: Any, tokens: list[int], prompt_length: int) -> tuple[float, int]:
    """Reference: (summed NLL, count) of one example's answer tokens, the example alone (no
    padding), token t scored by the logits at t - 1 with torch's cross-entropy."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([tokens])).logits[0].double()
    target = torch.tensor(tokens[prompt_length:])
    nll = F.cross_entropy(logits[prompt_length - 1 : -1], target, reduction="sum")
    return float(nll), len(target)


def byte_bpe_tokenizer(texts: list[str], template: str = CHATML) -> Any:
    """A Qwen2 tokenizer (byte-level BPE, Qwen's split regex) trained on ``texts``, with
    ChatML's special tokens and template: transformers 5 loads any ``qwen2`` model folder's
    tokenizer as ``Qwen2Tokenizer``, which rebuilds its own pipeline from the saved vocabulary
    and merges, so a word-level tokenizer would not survive the round trip."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tk.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False)
    )
    model = json.loads(tk.to_str())["model"]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    tok.chat_template = template
    return tok


# flwr 1.41's error box as it prints it, its message wrapped over several lines
FLWR_BOX = """\
╭─ Error ──────────────────────────────────────────────╮
│ Connection to the SuperLink is unavailable. Please    │
│ check your network connection and 'address' in the    │
│ SuperLink connection configuration.                   │
╰──────────────────────────────────────────────────────╯
"""
