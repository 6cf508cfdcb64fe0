"""How a causal LM is scored (``fedhello.model.generation``), against independent
computations: the response-token loss is the model's own loss and a token-weighted mean over
batches of any length, perplexity its exp; batched greedy generation with left padding gives
each prompt's answer alone (and a hand-written decoding loop's); ROUGE-L is rouge-score's LCS
F-measure; exact match compares normalised answers. Tiny random decoders (conftest)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import greedy_answer, response_nll

from fedhello.core.config import DataConfig
from fedhello.model.generation import (
    generate_answers,
    generation_scores,
    normalise,
    response_loss,
    rouge_l,
)
from fedhello.tasks import task_for

# the toy's words only (conftest.lm_words): prompts and answers of different token counts
ROWS = [
    ("Define the word dog.", "a kind of animal"),
    ("Describe cat.", "a cat"),
    ("Tell me what bread means.", "a kind of food a kind of food a kind of food"),
    ("What is a boat?", "boat"),
    ("Explain the word rice.", "rice is a kind of food"),
    ("Describe bus.", "a kind of vehicle"),
    ("Define the word milk.", "a kind of food is milk"),
]


def _model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _encode(tok: Any, rows: list[tuple[str, str]], max_length: int = 48) -> Any:
    """The rows' LMInputs as the causal-lm kind encodes them (Alpaca columns)."""
    task = task_for("causal-lm")
    table = pd.DataFrame({"instruction": [p for p, _ in rows], "output": [a for _, a in rows]})
    cfg = DataConfig(name="mem")
    task.check_inputs(table, cfg)
    inputs = task.read_inputs({"train": table}, cfg)
    labels = torch.zeros(len(inputs), dtype=torch.long)
    return task.encode(inputs, labels, tok, max_length, False)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def decoder(
    request: pytest.FixtureRequest, tiny_llama_dir: Path, tiny_qwen2_dir: Path
) -> tuple[Any, Any]:
    folder = tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir
    return _model(folder), _tokenizer(folder)


# -- response loss and perplexity ------------------------------------------------------------


def test_response_loss_is_the_models_own_loss_on_equal_answers(decoder: tuple[Any, Any]) -> None:
    """Every answer the same length (the toy's "a kind of <category>"): transformers' loss on
    the one batch, whatever batches response_loss scores them in."""
    model, tok = decoder
    rows = [(p, a) for p, a in ROWS if a.startswith("a kind of") and len(a.split()) == 4]
    assert len(rows) == 2
    rows += [("What is a cow?", "a kind of animal"), ("Tell me what train means.",
                                                       "a kind of vehicle")]  # fmt: skip
    data = _encode(tok, rows)
    answers = data.lengths - data.prompt_lengths
    assert len(set(answers.tolist())) == 1 and len(set(data.prompt_lengths.tolist())) > 1
    idx = np.arange(len(rows))
    with torch.inference_mode():
        hf = float(model(**data.batch(idx)).loss)
    for batch_size in (len(rows), 3, 1):
        got = response_loss(model, data, idx, batch_size)
        assert got["loss"] == pytest.approx(hf, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(hf), rel=1e-5)
        assert got["tokens"] == int(answers.sum()) and got["examples"] == len(rows)


def test_response_loss_is_token_weighted_over_batches_of_any_length(
    decoder: tuple[Any, Any],
) -> None:
    """Answers of 1 to 13 tokens in batches of 2: the NLL summed over every answer token,
    each example run alone, divided by the token count (not a mean of per-batch means)."""
    model, tok = decoder
    data = _encode(tok, ROWS)
    idx = np.array([6, 0, 3, 5, 2, 1])  # any order, a subset: the rows asked for, no others
    totals = [response_nll(model, data.tokens(i), int(data.prompt_lengths[i])) for i in idx]
    nll, tokens = sum(t[0] for t in totals), sum(t[1] for t in totals)
    assert len({t[1] for t in totals}) > 2  # the answers' token counts differ
    got = response_loss(model, data, idx, batch_size=2)
    assert got["tokens"] == tokens and got["examples"] == len(idx)
    assert got["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    # the batches as response_loss forms them (by length): their means' mean is another number
    order = idx[data.length_order(idx)]
    per_batch = []
    for start in range(0, len(order), 2):
        part = [totals[list(idx).index(i)] for i in order[start : start + 2]]
        per_batch.append(sum(p[0] for p in part) / sum(p[1] for p in part))
    assert abs(float(np.mean(per_batch)) - nll / tokens) > 1e-3


def test_perplexity_of_no_tokens_and_of_an_overflow() -> None:
    """No rows: nan loss and inf perplexity (nothing was scored); a loss past exp's range is
    an infinite perplexity, not an OverflowError."""

    class Rows:
        references = ("",)

        def length_order(self, idx: np.ndarray) -> np.ndarray:
            return np.argsort(idx)

        def batch(self, idx: Any, augment: Any = None) -> dict[str, torch.Tensor]:
            ids = torch.zeros((len(idx), 3), dtype=torch.long)
            return {"input_ids": ids, "labels": torch.tensor([[-100, 1, 1]] * len(idx))}

        def prompt_ids(self, i: int) -> list[int]:
            return [0]

    class Confident(torch.nn.Module):  # all its mass on token 0, never the answer's 1
        def forward(self, input_ids: torch.Tensor) -> Any:
            logits = torch.zeros((*input_ids.shape, 2))
            logits[..., 0] = 2000.0
            return type("Out", (), {"logits": logits})()

    empty = response_loss(Confident(), Rows(), np.array([], dtype=np.int64), 4)
    assert math.isnan(empty["loss"]) and empty["perplexity"] == math.inf
    assert empty["tokens"] == 0 and empty["examples"] == 0
    sure = response_loss(Confident(), Rows(), np.arange(2), 4)
    assert sure["loss"] == pytest.approx(2000.0) and sure["tokens"] == 4
    assert sure["perplexity"] == math.inf


# -- greedy generation -----------------------------------------------------------------------


def test_batched_left_padded_generation_answers_as_each_prompt_alone(
    decoder: tuple[Any, Any],
) -> None:
    """Prompts of 7 to 12 tokens in one left-padded batch: each answer is the one the prompt
    gets alone, and the one a hand-written greedy loop (no cache, no padding) gives."""
    model, tok = decoder
    data = _encode(tok, ROWS)
    idx = np.array([2, 1, 0, 3, 4])
    assert len({len(data.prompt_ids(int(i))) for i in idx}) >= 3  # real padding in the batch
    batched = generate_answers(model, tok, data, idx, batch_size=len(idx), max_new_tokens=6)
    alone = [generate_answers(model, tok, data, np.array([i]), 1, 6)[0] for i in idx]
    by_hand = [greedy_answer(model, tok, data.prompt_ids(int(i)), 6) for i in idx]
    assert batched == alone == by_hand
    assert len(set(batched)) > 1 and all(batched)  # the random model says different things


class EchoModel:
    """A stand-in model whose ``generate`` answers each prompt (the attention mask's ones, left
    padded) with the tokens ``answers`` maps it to, then EOS, padded on the right as
    transformers pads finished rows; ``generate`` sees what a real model would."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], eos: int, pad: int) -> None:
        self.answers, self.eos, self.pad = answers, eos, pad
        self.calls: list[tuple[int, int]] = []

    def eval(self) -> EchoModel:
        return self

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **kw: Any
    ) -> torch.Tensor:
        assert kw["do_sample"] is False and self.eos in kw["eos_token_id"]
        # plain greedy whatever the model's generation_config asks
        assert kw["repetition_penalty"] == 1.0 and kw["no_repeat_ngram_size"] == 0
        self.calls.append((int(input_ids.shape[0]), int(input_ids.shape[1])))
        outs = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            n = int(mask.sum())
            assert mask[-n:].all() and not mask[:-n].any()  # left padding
            assert (ids[:-n] == self.pad).all()
            outs.append(self.answers[tuple(ids[-n:].tolist())] + [self.eos])
        width = max(len(o) for o in outs)
        tail = torch.tensor([o + [self.pad] * (width - len(o)) for o in outs])
        return torch.cat([input_ids, tail[:, :max_new_tokens]], dim=1)


def test_generation_scores_restore_the_order_and_score_each_answer(tiny_llama_dir: Path) -> None:
    """Answers given by a stand-in model: the reference itself, the reference with a full
    stop (equal after normalising), a wrong category (ROUGE-L 3/4: the LCS of 3 words over 4
    and 4), nothing at all; the scores are per row whatever order the batches ran in."""
    tok = _tokenizer(tiny_llama_dir)
    rows = [ROWS[0], ROWS[2], ROWS[5], ROWS[3]]  # prompts of 9, 12, 8 and 10 tokens
    data = _encode(tok, rows)
    said = ["a kind of animal", "a kind of food a kind of food a kind of food .",
            "a kind of food", ""]  # fmt: skip
    answers = {
        tuple(data.prompt_ids(i)): tok(s, add_special_tokens=False)["input_ids"]
        for i, s in enumerate(said)
    }
    model = EchoModel(answers, tok.eos_token_id, tok.pad_token_id)
    idx = np.arange(len(rows))
    got = generation_scores(model, tok, data, idx, batch_size=3, max_new_tokens=20, keep=2)
    assert model.calls and all(b <= 3 for b, _ in model.calls)  # batched, left padded
    assert got["generated"] == 4
    assert got["exact_match"] == pytest.approx(2 / 4)
    assert got["rouge_l"] == pytest.approx((1 + 1 + 0.75 + 0) / 4)
    assert [s["row"] for s in got["samples"]] == [0, 1]
    assert got["samples"][1]["answer"] == "a kind of food a kind of food a kind of food."
    assert got["samples"][1]["reference"] == rows[1][1]
    assert got["samples"][0]["rouge_l"] == 1.0
    assert "Define the word dog" in got["samples"][0]["prompt"]


class ScriptedModel:
    """A stand-in whose ``generate`` continues every prompt with the same tokens, cut as
    transformers cuts them: after the first of ``eos_token_id`` (an id or a list), at
    ``max_new_tokens``, finished rows padded on the right."""

    def __init__(self, continuation: list[int], generation_eos: Any = None) -> None:
        from transformers import GenerationConfig

        self.continuation = continuation
        self.generation_config = GenerationConfig(eos_token_id=generation_eos)

    def eval(self) -> ScriptedModel:
        return self

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kw: Any) -> torch.Tensor:
        stops = kw["eos_token_id"]
        stops = set(stops) if isinstance(stops, list) else {stops}
        said = self.continuation[:max_new_tokens]
        ends = [i for i, t in enumerate(said) if t in stops]
        said = said[: ends[0] + 1] if ends else said
        tail = torch.tensor([said] * len(input_ids), dtype=torch.long)
        return torch.cat([input_ids, tail], dim=1)


def test_an_answer_ends_at_the_chat_templates_end_of_turn() -> None:
    """A tokenizer whose EOS is not the token its template ends a turn with (as Qwen2.5's
    base models: EOS <|endoftext|>, turns <|im_end|>): training ends every answer with
    <|im_end|>, so generation stops there too; what the model says after it is not the
    answer."""
    from conftest import lm_words
    from helpers import word_tokenizer

    tok = word_tokenizer(lm_words(), eos="[EOS]")
    assert tok.eos_token == "[EOS]" and tok.convert_tokens_to_ids("<|im_end|>") == 3
    data = _encode(tok, ROWS[:2])
    assert data.tokens(0)[-1] == 3  # the answer the model learns ends with <|im_end|>
    said = tok("a kind of animal <|im_end|> What is a dog", add_special_tokens=False)["input_ids"]
    got = generate_answers(ScriptedModel(said), tok, data, np.arange(2), 2, 20)
    assert got == ["a kind of animal", "a kind of animal"]
    # the tokenizer's EOS still ends an answer
    said = tok("a cat [EOS] What is a dog", add_special_tokens=False)["input_ids"]
    assert generate_answers(ScriptedModel(said), tok, data, np.arange(1), 1, 20) == ["a cat"]


def test_stop_tokens_join_eos_the_generation_config_and_the_turn_end(
    tiny_llama_dir: Path,
) -> None:
    from conftest import lm_words
    from helpers import CHATML, word_tokenizer

    from fedhello.model.generation import stop_tokens

    tok = word_tokenizer(lm_words(), eos="[EOS]")
    eos, end = tok.convert_tokens_to_ids("[EOS]"), tok.convert_tokens_to_ids("<|im_end|>")
    dog = tok.convert_tokens_to_ids("dog")
    assert stop_tokens(ScriptedModel([], [dog, eos]), tok) == [eos, dog, end]
    assert stop_tokens(ScriptedModel([], dog), tok) == [eos, dog, end]
    # a template that closes a turn with no special token: EOS alone
    plain = word_tokenizer(lm_words(), CHATML.replace("'<|im_end|>' + ", ""), eos="[EOS]")
    assert stop_tokens(ScriptedModel([]), plain) == [eos]
    # a template that refuses the chat: EOS and the generation config's
    refusing = word_tokenizer(lm_words(), "{{ raise_exception('no') }}", eos="[EOS]")
    assert stop_tokens(ScriptedModel([], dog), refusing) == [eos, dog]
    # the tiny Llama: EOS is the end of turn, as in its generation config
    llama = _model(tiny_llama_dir)
    assert stop_tokens(llama, _tokenizer(tiny_llama_dir)) == [end]


# -- ROUGE-L and exact match -------------------------------------------------------------------


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    return table[-1][-1]


def test_rouge_l_is_the_lcs_f_measure() -> None:
    """By hand: "a kind of food that is sweet" against "a kind of food": LCS 4, precision 4/7,
    recall 1, F = 8/11; word order matters (LCS, not bag of words); case and punctuation do
    not; no overlap is 0; and rouge-score's own scorer agrees on every pair."""
    from rouge_score import rouge_scorer

    pairs = [
        ("a kind of food that is sweet", "a kind of food"),
        ("the cat sat on the mat", "the cat lay on a mat"),
        ("mat the on sat cat the", "the cat sat on the mat"),
        ("A Kind of Animal.", "a kind of animal"),
        ("boat", "a kind of vehicle"),
        ("running dogs", "the dog runs"),
    ]
    got = rouge_l([p for p, _ in pairs], [r for _, r in pairs])
    assert got[0] == pytest.approx(8 / 11)
    lcs = _lcs(pairs[1][0].split(), pairs[1][1].split())  # the cat .. on .. mat
    precision = recall = lcs / 6
    assert lcs == 4 and got[1] == pytest.approx(2 * precision * recall / (precision + recall))
    assert got[2] < got[1] and got[3] == 1.0 and got[4] == 0.0
    assert got[5] > 0  # the stemmer: dogs/dog and running/runs share a stem
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert got == [scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs]


def test_rouge_l_wants_one_reference_per_answer() -> None:
    with pytest.raises(ValueError):
        rouge_l(["a", "b"], ["a"])


@pytest.mark.parametrize(
    "answer,reference,equal",
    [
        ("A kind of animal.", "a kind of animal", True),
        ("  a   kind\tof\nanimal ", "a kind of animal", True),
        ("a kind-of animal!", "a kind of animal", True),  # punctuation is a space
        ("'a kind of animal'", "a kind of animal", True),
        ("a kind of animals", "a kind of animal", False),
        ("a kind of", "a kind of animal", False),
        ("akind of animal", "a kind of animal", False),
        ("", "", True),
    ],
)
def test_exact_match_compares_normalised_answers(answer: str, reference: str, equal: bool) -> None:
    assert (normalise(answer) == normalise(reference)) is equal


def test_normalise_is_lower_case_words_without_punctuation() -> None:
    assert normalise("  The Dog's BONE, (buried)!  ") == "the dog s bone buried"
