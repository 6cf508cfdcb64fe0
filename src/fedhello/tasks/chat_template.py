"""A decoder's training text from its own chat template: every prompt as the template writes
it for generation, the answer as what follows once the assistant's turn is written too (ending
with the template's end of turn, or EOS), and the token ids of both as the tokenizer gives
them. A template that writes the prompt differently when the answer follows, or an answer it
cannot end, is one line naming the model (``fedhello.tasks.causal_lm`` encodes with these).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedhello.core.errors import ConfigError, DataError, ModelError
from fedhello.tasks.lm_formats import Exchange


def check_chat_template(processor: Any, source: str) -> None:
    """A ModelError naming the model unless its tokenizer has a chat template."""
    if not getattr(processor, "chat_template", None):
        raise ModelError(
            f"model {source!r}: its tokenizer has no chat template, which model.task = "
            "'causal-lm' writes every prompt with; allowed: a chat (instruction-tuned) model, "
            "whose tokenizer_config.json or chat_template.jinja holds one, or model.task = "
            "'text' to train a classifier on this model"
        )


def check_prompts_fit(prompt_lengths: np.ndarray, max_length: int) -> None:
    too_long = prompt_lengths + 1 > max_length
    if too_long.any():
        worst = int(np.argmax(prompt_lengths))
        raise ConfigError(
            f"model.max_length = {max_length}: {int(too_long.sum())} of {len(prompt_lengths)} "
            f"prompts do not fit with one answer token (the longest, example {worst}, has "
            f"{int(prompt_lengths[worst])} tokens in the chat template); allowed: max_length "
            f">= {int(prompt_lengths.max()) + 1}, plus room for the answers (a batch is cut to "
            "its longest example)"
        )


def render(processor: Any, exchanges: list[Exchange], source: str) -> tuple[list[str], list[str]]:
    """(prompt text, answer text) of every example: the prompt as the chat template writes it
    for generation, the answer what follows it when the assistant's turn is written too,
    ending with the template's end of turn (the EOS token where it writes no special token)."""
    if not exchanges:
        return [], []
    prompts = [[{"role": r, "content": c} for r, c in e.prompt] for e in exchanges]
    fulls = [
        [*p, {"role": "assistant", "content": e.response}]
        for p, e in zip(prompts, exchanges, strict=True)
    ]
    try:
        prompt_texts = processor.apply_chat_template(
            prompts, tokenize=False, add_generation_prompt=True
        )
        full_texts = processor.apply_chat_template(fulls, tokenize=False)
    except Exception as err:  # jinja raises what a template says (roles it refuses, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"model {source!r}: its chat template refuses the data: {first}") from None
    ends = turn_ends(processor)
    eos = getattr(processor, "eos_token", None)
    completions = []
    for i, (prompt, full) in enumerate(zip(prompt_texts, full_texts, strict=True)):
        if not full.startswith(prompt):
            raise ModelError(
                f"model {source!r}: its chat template writes example {i}'s prompt differently "
                "when the answer follows, so the prompt is not a prefix of the training text; "
                "allowed: a template whose generation prompt is where the assistant's turn "
                "starts"
            )
        answer = full[len(prompt) :].rstrip()
        if not answer.endswith(ends):
            if not eos:
                raise ModelError(
                    f"model {source!r}: its chat template ends an answer with no special token "
                    "and its tokenizer has no EOS token: generation could not learn to stop"
                )
            answer += eos
        completions.append(answer)
    return list(prompt_texts), completions


def turn_ends(processor: Any) -> tuple[str, ...]:
    """The tokens a template may end an assistant's turn with: EOS and the special added
    tokens (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...)."""
    ends = {str(t.content) for t in getattr(processor, "added_tokens_decoder", {}).values()
            if getattr(t, "special", False)}  # fmt: skip
    eos = getattr(processor, "eos_token", None)
    if eos:
        ends.add(str(eos))
    return tuple(sorted(e for e in ends if e))


def tokens(processor: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` as written (the template writes any BOS itself): through a
    fast tokenizer's own backend where there is one (the same ids, without transformers'
    per-text conversion: a third of the time on 160k texts) unless the backend is set to
    truncate or pad, which transformers' call would turn off."""
    if not texts:
        return []
    backend: Any = getattr(processor, "backend_tokenizer", None)
    if (
        getattr(processor, "is_fast", False)
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
    ):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return [list(ids) for ids in processor(texts, add_special_tokens=False)["input_ids"]]
