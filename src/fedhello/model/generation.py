"""How a causal language model is scored: response-token loss and perplexity (cheap, every
round), and greedy generation scored by ROUGE-L and exact match (dear: every
``federation.generate-every`` rounds, at the end, and once for the base model as the
zero-shot reference).

Perplexity is ``exp`` of the mean negative log-likelihood per *response token* over all the
rows scored, not the mean of per-batch means: batches of long answers would otherwise count
as much as batches of short ones. Only response tokens count (the prompt's labels are -100,
``fedhello.tasks.causal_lm``), as in training.

Generation is greedy (no sampling: the same model answers the same text, so rounds, runs
and strategies compare without sampling noise), batched with the prompts padded on the left
so that every answer starts right after its prompt, and stopping at any token that ends an
answer (``stop_tokens``: the end of turn training taught, not only the tokenizer's EOS).
ROUGE-L is Google's ``rouge-score`` (``RougeScorer(["rougeL"], use_stemmer=True)``,
F-measure), the implementation the FlowerTune leaderboard and most papers report; exact match
compares answers after lower-casing, dropping punctuation and collapsing spaces.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from fedhello.model.accelerator import CPU_FP32, Accelerator


class GenerativeInputs(Protocol):
    """What the scoring reads of a causal-LM task's encoded rows (``LMInputs``)."""

    def batch(
        self, idx: Sequence[int] | np.ndarray, augment: tuple[int, ...] | None = None
    ) -> dict[str, torch.Tensor]: ...

    def length_order(self, idx: np.ndarray) -> np.ndarray: ...

    references: list[str]  # each row's reference answer, as written in the data

    def prompt_ids(self, i: int) -> list[int]: ...


@torch.inference_mode()
def response_loss(
    model: torch.nn.Module,
    data: GenerativeInputs,
    indices: np.ndarray,
    batch_size: int,
    accelerator: Accelerator = CPU_FP32,
) -> dict[str, Any]:
    """``loss`` (mean NLL per response token, nats), ``perplexity`` (its exp), ``tokens``
    (response tokens scored) and ``examples`` over the rows ``indices``; fp32 log-softmax
    under the accelerator's autocast."""
    model.eval()
    indices = np.asarray(indices)
    order = data.length_order(indices)
    nll, tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = accelerator.to_device(data.batch(indices[order[start : start + batch_size]]))
        labels = batch.pop("labels")
        with accelerator.autocast():
            logits = model(**batch).logits
        # position t predicts token t + 1: the model's own shift, as in its training loss
        shifted = labels[:, 1:]
        mask = shifted != -100
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = logp.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll -= float(picked[mask].double().sum())
        tokens += int(mask.sum())
    loss = nll / tokens if tokens else math.nan
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if tokens and loss < 700 else math.inf,
        "tokens": tokens,
        "examples": len(indices),
    }


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, spaces collapsed: what exact match compares. Every
    ASCII punctuation mark becomes a space, not only a trailing one (METHOD.md's minimum), as
    SQuAD's exact match does: a model's quotes and hyphens ("kind-of") are not its meaning."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference (``rouge-score``)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        float(scorer.score(ref, pred)["rougeL"].fmeasure)
        for pred, ref in zip(predictions, references, strict=True)
    ]


@torch.inference_mode()
def generate_answers(
    model: Any,
    tokenizer: Any,
    data: GenerativeInputs,
    indices: np.ndarray,
    batch_size: int,
    max_new_tokens: int,
    accelerator: Accelerator = CPU_FP32,
) -> list[str]:
    """Greedy answers to the prompts of ``indices`` (in their order), special tokens dropped:
    left-padded batches of similar length, at most ``max_new_tokens`` each, stopping at any of
    :func:`stop_tokens`."""
    model.eval()
    indices = np.asarray(indices)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_tokens(model, tokenizer)
    answers: list[str] = [""] * len(indices)
    order = data.length_order(indices)
    for start in range(0, len(order), batch_size):
        pos = order[start : start + batch_size]
        prompts = [data.prompt_ids(int(indices[p])) for p in pos]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every answer starts at ``width``
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        inputs = accelerator.to_device({"input_ids": ids, "attention_mask": mask})
        with accelerator.autocast():
            # greedy without a repetition penalty or an n-gram block, even where the model's
            # generation_config asks for one (Qwen2.5-Instruct's 1.05)
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                repetition_penalty=1.0, no_repeat_ngram_size=0,
                pad_token_id=pad, eos_token_id=stops, use_cache=True,
            )  # fmt: skip
        for row, p in enumerate(pos):
            answers[p] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers


def stop_tokens(model: Any, tokenizer: Any) -> list[int]:
    """The token ids that end a generated answer: the tokenizer's EOS, the model's generation
    config's (Llama 3, Gemma and Phi-3 list their end-of-turn tokens there) and the special
    token the chat template closes an assistant's turn with, which training appends to every
    answer (``fedhello.tasks.causal_lm``). Passing ``generate`` the tokenizer's EOS alone
    replaces the generation config's list, and where the template ends a turn otherwise
    (Qwen2.5's base models: EOS ``<|endoftext|>``, turns ``<|im_end|>``) the answer would run
    on past its end into a new turn, up to ``max_new_tokens``."""
    config = getattr(model, "generation_config", None)
    found: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None),
                  turn_end_token(tokenizer)):  # fmt: skip
        for token in value if isinstance(value, list | tuple) else [value]:
            if token is not None and int(token) not in found:
                found.append(int(token))
    return found


def turn_end_token(tokenizer: Any) -> int | None:
    """The special token the chat template writes right after an assistant's answer; None
    when it writes none there (or cannot write a user and an assistant turn)."""
    mark = "fedhello-answer"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}]
    try:
        text = str(tokenizer.apply_chat_template(chat, tokenize=False))
    except Exception:  # jinja raises what a template says: no end of turn to learn from it
        return None
    if mark not in text:
        return None
    after = text[text.rindex(mark) + len(mark) :].lstrip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(getattr(tokenizer, "all_special_ids", [])) | {
        int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if getattr(t, "special", False)
    }  # fmt: skip
    return int(ids[0]) if ids and int(ids[0]) in special else None


def generation_scores(
    model: Any,
    tokenizer: Any,
    data: GenerativeInputs,
    indices: np.ndarray,
    batch_size: int,
    max_new_tokens: int,
    accelerator: Accelerator = CPU_FP32,
    keep: int | None = None,
) -> dict[str, Any]:
    """``rouge_l`` (mean F-measure), ``exact_match`` (share of answers equal to their
    reference after ``normalise``), ``generated`` (how many) and ``samples``: the prompts
    with their reference and answer (the first ``keep``; None: all), for the run folder."""
    answers = generate_answers(model, tokenizer, data, indices, batch_size, max_new_tokens,
                               accelerator)  # fmt: skip
    refs = [data.references[int(i)] for i in indices]
    scores = rouge_l(answers, refs)
    exact = [normalise(a) == normalise(r) for a, r in zip(answers, refs, strict=True)]
    samples = [
        {"row": int(i), "prompt": tokenizer.decode(data.prompt_ids(int(i))), "reference": r,
         "answer": a, "rouge_l": round(s, 4)}
        for i, r, a, s in list(zip(indices, refs, answers, scores, strict=True))[slice(keep)]
    ]  # fmt: skip
    return {
        "rouge_l": float(np.mean(scores)) if scores else math.nan,
        "exact_match": float(np.mean(exact)) if exact else math.nan,
        "generated": len(answers),
        "samples": samples,
    }
