"""The causal-lm kind's data side: three input formats, the chat template's prompt as an exact
prefix, the loss on answer tokens only, the length rule, the label-less path, detection, the
config checks, and the built-in wordnet-definitions (held-out words). No network: a word-level
tokenizer with a ChatML template is built in code."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from fedhello.core.config import DataConfig, load_config
from fedhello.core.errors import ConfigError, DataError, ModelError
from fedhello.data.loading import load_raw, load_tables
from fedhello.tasks import CausalLMTask, check_config, detect_task, task_for
from fedhello.tasks.causal_lm import IGNORE, LMInputs

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]
WORDS = [
    "system", "user", "assistant", "Define", "the", "word", "dog", "cat", ".", "a", "domestic",
    "animal", "small", "furry", "pet", "with", "whiskers", "kept", "as", "You", "are", "helpful",
    "Say", "hi", "hello", ":", "-", ":-", "5", "degrees", "it", "is", "cold",
]  # fmt: skip

task = CausalLMTask()


def make_tokenizer(template: str | None = CHATML) -> Any:
    """A word-level tokenizer (whitespace and punctuation runs split words) with ChatML."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer()


def ids(tok: Any, *words: str) -> list[int]:
    """Token ids by hand: one vocabulary entry per word (independent of the tokenizer)."""
    vocab = tok.get_vocab()
    return [vocab[w] for w in words]


ROWS = [
    ("Define the word dog.", "a domestic animal"),
    ("Define the word cat.", "a small furry pet with whiskers kept as a pet"),
]


def alpaca(rows: list[tuple[str, str]] = ROWS) -> pd.DataFrame:
    return pd.DataFrame({"instruction": [p for p, _ in rows], "output": [a for _, a in rows]})


def encode_table(table: Any, tok: Any, max_length: int = 64, **data: Any) -> LMInputs:
    cfg = DataConfig(name="mem", **data)
    task.check_inputs(table, cfg)
    inputs = task.read_inputs({"train": table}, cfg)
    return task.encode(inputs, torch.zeros(len(inputs), dtype=torch.long), tok, max_length, False)


# -- formats, the prompt prefix, the label mask --------------------------------------------------


def test_the_three_formats_give_the_same_tokens_and_split(tok: Any) -> None:
    chat = pd.DataFrame({"messages": [
        [{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in ROWS
    ]})  # fmt: skip
    columns = pd.DataFrame({"q": [p for p, _ in ROWS], "a": [a for _, a in ROWS]})
    # Alpaca with an input column: empty cells (NaN from JSONL, None) add nothing.
    with_input = alpaca().assign(input=[None, float("nan")])
    encoded = [
        encode_table(alpaca(), tok),
        encode_table(with_input, tok),
        encode_table(chat, tok),
        encode_table(chat.rename(columns={"messages": "conv"}), tok, messages_column="conv"),
        encode_table(columns, tok, prompt_column="q", response_column="a"),
    ]
    first = encoded[0]
    for other in encoded[1:]:
        assert [other.tokens(i) for i in range(2)] == [first.tokens(i) for i in range(2)]
        assert other.prompt_lengths.tolist() == first.prompt_lengths.tolist()
        assert other.references == [a for _, a in ROWS]
    # The same tokens as the hand-written ChatML of the first example.
    prompt = ids(tok, "<|im_start|>", "user", "Define", "the", "word", "dog", ".", "<|im_end|>",
                 "<|im_start|>", "assistant")  # fmt: skip
    answer = ids(tok, "a", "domestic", "animal", "<|im_end|>")
    assert first.tokens(0) == prompt + answer
    assert first.prompt_ids(0) == prompt


def test_an_alpaca_input_follows_the_instruction_after_a_blank_line(tok: Any) -> None:
    table = pd.DataFrame({"instruction": ["Define the word"], "input": ["dog"],
                          "output": ["a domestic animal"]})  # fmt: skip
    got = encode_table(table, tok)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Define the word\n\ndog"}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    assert got.prompt_ids(0) == tok(rendered, add_special_tokens=False)["input_ids"]


def test_the_prompt_is_the_generation_prompt_and_an_exact_prefix(tok: Any) -> None:
    system = [{"role": "system", "content": "You are helpful"}]
    turns = [*system, {"role": "user", "content": "Say hi"},
             {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "Define the word cat."},
             {"role": "assistant", "content": "a small furry pet"}]  # fmt: skip
    got = encode_table(pd.DataFrame({"messages": [turns]}), tok)
    # Independently: the template's generation prompt of every turn before the last answer.
    prompt_text = tok.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
    expected = tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert got.prompt_ids(0) == expected
    assert got.tokens(0)[: len(expected)] == expected
    assert got.tokens(0)[len(expected) :] == ids(tok, "a", "small", "furry", "pet", "<|im_end|>")
    assert got.references == ["a small furry pet"]


def test_labels_are_the_answer_tokens_and_minus_100_on_prompt_and_padding(tok: Any) -> None:
    got = encode_table(alpaca(), tok)
    batch = got.batch([1, 0])
    long_ = got.tokens(1)
    short = got.tokens(0)
    p0, p1 = 10, 10  # the ChatML prompt of "Define the word <w>." is 10 words
    width = len(long_)
    pad = tok.pad_token_id
    exp_ids = [long_, short + [pad] * (width - len(short))]
    exp_mask = [[1] * width, [1] * len(short) + [0] * (width - len(short))]
    exp_labels = [
        [IGNORE] * p1 + long_[p1:],
        [IGNORE] * p0 + short[p0:] + [IGNORE] * (width - len(short)),
    ]
    assert batch["input_ids"].tolist() == exp_ids
    assert batch["attention_mask"].tolist() == exp_mask
    assert batch["labels"].tolist() == exp_labels
    assert batch["labels"].dtype == torch.long
    # Each batch is cut to its own longest example; a batch of the short one has no padding.
    assert got.batch([0])["input_ids"].shape == (1, len(short))
    assert got.length_order(np.array([1, 0])).tolist() == [1, 0]
    # labels: one class per example (the partition's), a 1-D tensor as for every kind.
    assert got.labels.shape == (2,) and len(got) == 2


def test_a_causal_lm_loss_is_the_mean_over_answer_tokens(tok: Any) -> None:
    """The labels as transformers reads them: its shifted loss equals the cross-entropy of
    each answer token given the tokens before it, computed by hand."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    got = encode_table(alpaca(), tok)
    batch = got.batch([0, 1])
    with torch.no_grad():
        out = model(**batch)
    losses = []
    for row in range(2):
        seq, p = got.tokens(row), int(got.prompt_lengths[row])
        logits = out.logits[row]
        for t in range(p, len(seq)):  # token t is predicted at position t - 1
            losses.append(torch.nn.functional.cross_entropy(logits[t - 1], torch.tensor(seq[t])))
    assert float(out.loss) == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)


def test_an_answer_across_the_prompt_boundary_keeps_the_prompt_and_gets_eos() -> None:
    """A template whose generation prompt ends in ':' and an answer opening with '-': the
    whole text tokenises ':-' as one token, so the answer is tokenised after the prompt's
    tokens; the template ends no answer with a special token, so EOS is appended."""
    template = (
        "{% for m in messages %}{{ m['role'] + ' : ' + m['content'] + ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant :' }}{% endif %}"
    )
    tok = make_tokenizer(template)
    got = encode_table(
        pd.DataFrame({"q": ["it is cold"], "a": ["-5 degrees"]}), tok,
        prompt_column="q", response_column="a",
    )  # fmt: skip
    prompt = ids(tok, "user", ":", "it", "is", "cold", "assistant", ":")
    assert got.prompt_ids(0) == prompt
    assert got.tokens(0) == prompt + ids(tok, "-", "5", "degrees", "<|im_end|>")


# -- lengths ------------------------------------------------------------------------------------


def test_max_length_cuts_answers_never_prompts_and_counts_them(
    tok: Any, caplog: pytest.LogCaptureFixture
) -> None:
    full = encode_table(alpaca(), tok)
    lengths = [len(full.tokens(i)) for i in range(2)]  # prompts are 10 tokens
    assert lengths == [14, 21]
    with caplog.at_level(logging.INFO, logger="fedhello.tasks.causal_lm"):
        cut = encode_table(alpaca(), tok, max_length=16)
    assert cut.truncated == 1
    assert "1 of 2 answers cut at model.max_length = 16" in caplog.text
    assert cut.tokens(0) == full.tokens(0)  # fits: untouched
    assert cut.tokens(1) == full.tokens(1)[:16]  # the answer's end is cut
    assert cut.prompt_ids(1) == full.prompt_ids(1)
    labels = cut.batch([1])["labels"][0].tolist()
    assert labels == [IGNORE] * 10 + full.tokens(1)[10:16]
    # The shortest that keeps every prompt with one answer token: prompt + 1.
    assert encode_table(alpaca(), tok, max_length=11).lengths.tolist() == [11, 11]


def test_a_prompt_longer_than_max_length_is_one_line(tok: Any) -> None:
    with pytest.raises(ConfigError) as err:
        encode_table(alpaca(), tok, max_length=10)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model.max_length = 10: 2 of 2 prompts do not fit")
    assert "allowed: max_length >= 11" in message


# -- errors -------------------------------------------------------------------------------------


def test_a_conversation_without_an_assistant_turn_names_its_row(tok: Any) -> None:
    table = pd.DataFrame({"messages": [
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "Say hi"}],
    ]})  # fmt: skip
    with pytest.raises(DataError, match=r"^data.messages_column = 'messages': split 'train' "
                       r"row 1 has no assistant turn; allowed"):  # fmt: skip
        encode_table(table, tok)
    bad = pd.DataFrame({"messages": [[{"role": "user", "text": "hi"}]]})
    with pytest.raises(DataError, match=r"row 0 has a turn .* allowed: \{\"role\""):
        encode_table(bad, tok)


def test_turns_after_the_last_answer_are_dropped_and_counted(
    tok: Any, caplog: pytest.LogCaptureFixture
) -> None:
    turns = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "Define the word dog."}]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="fedhello.tasks.causal_lm"):
        got = encode_table(pd.DataFrame({"messages": [turns]}), tok)
    assert got.references == ["hello"]
    assert "1 conversations end with turns after their last assistant turn" in caplog.text


@pytest.mark.parametrize(
    ("table", "data", "expected"),
    [
        (pd.DataFrame({"q": ["x"], "a": ["y"]}), {"prompt_column": "question",
         "response_column": "a"},
         "data.prompt_column = 'question': dataset 'mem' has no such prompt column; its "
         "columns: q, a"),
        (pd.DataFrame({"q": ["x"], "a": ["y"]}), {"prompt_column": "q",
         "response_column": "answer"},
         "data.response_column = 'answer': dataset 'mem' has no such response column; its "
         "columns: q, a"),
        (pd.DataFrame({"m": [[]]}), {"messages_column": "messages"},
         "data.messages_column = 'messages': dataset 'mem' has no such messages column; its "
         "columns: m"),
        (pd.DataFrame({"instruction": ["x"], "answer": ["y"]}), {},
         "data.prompt_column unset: dataset 'mem' has no 'output' column for the Alpaca "
         "format (instruction, optional input, output); allowed: those columns, "
         "data.prompt_column and data.response_column, or data.messages_column; its "
         "columns: instruction, answer"),
        (pd.DataFrame({"text": ["x"]}), {},
         "data.prompt_column and data.messages_column unset: dataset 'mem' has neither the "
         "Alpaca columns (instruction, optional input, output) nor a 'messages' column; "
         "allowed: those, or set data.prompt_column and data.response_column, or "
         "data.messages_column; its columns: text"),
    ],
)  # fmt: skip
def test_a_missing_column_is_one_line_naming_it_and_its_key(
    table: pd.DataFrame, data: dict[str, str], expected: str
) -> None:
    with pytest.raises(DataError) as err:
        task.check_inputs(table, DataConfig(name="mem", **data))
    assert str(err.value) == expected


def test_a_tokenizer_without_a_chat_template_is_one_line_naming_the_model() -> None:
    tok = make_tokenizer(template=None)
    tok.name_or_path = "/models/base-lm"
    with pytest.raises(ModelError) as err:
        encode_table(alpaca(), tok)
    assert str(err.value).startswith(
        "model '/models/base-lm': its tokenizer has no chat template, which model.task = "
        "'causal-lm' writes every prompt with"
    )


# -- the model, the probe and the config ---------------------------------------------------------


def test_detects_decoders_and_not_encoders() -> None:
    from transformers import BertConfig, LlamaConfig, MPNetConfig, ViTConfig

    llama = LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2).to_dict()
    assert task.detects(llama) and detect_task(llama) == "causal-lm"
    assert task.detects({**llama, "architectures": ["LlamaForCausalLM"]})
    assert task.detects({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    assert not task.detects({**llama, "architectures": ["LlamaForSequenceClassification"]})
    for encoder in (BertConfig().to_dict(), MPNetConfig().to_dict(), ViTConfig().to_dict()):
        assert not task.detects(encoder)
        assert detect_task(encoder) in ("text", "image")
    for arch in ("BertForMaskedLM", "BertLMHeadModel", "MPNetForMaskedLM"):
        assert not task.detects({**BertConfig().to_dict(), "architectures": [arch]})
    assert task.export_class == "AutoModelForCausalLM" and task.uses_max_length


def test_the_synthetic_batch_is_full_size_with_a_prompt_mask_and_fixed() -> None:
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=5000))
    batch = task.synthetic_batch(model, 8, 40, 3)
    again = task.synthetic_batch(model, 8, 40, 3)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 40)
    assert bool(batch["attention_mask"].all())
    for ids_, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        p = int((labels == IGNORE).sum())
        assert 10 <= p <= 20  # a quarter to half is prompt
        assert bool((labels[:p] == IGNORE).all()) and torch.equal(labels[p:], ids_[p:])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (['train.loss="logit-adjusted"'], "config: train.loss = 'logit-adjusted' with "
         "model.task = 'causal-lm'"),
        (['train.head="frozen"'], "config: train.head = 'frozen' with model.task = "
         "'causal-lm': a language model gets no new head"),
        (['model.pooling="mean"'], "config: model.pooling = 'mean' with model.task = "
         "'causal-lm'"),
        (["train.calibration_tau=2"], "config: train.calibration_tau = 2.0 with train.loss = "
         "'auto' with model.task = 'causal-lm': auto is cross-entropy here"),
        (['data.text_column="body"'], "config: data.text_column = 'body' with model.task = "
         "'causal-lm'"),
    ],
)  # fmt: skip
def test_classifier_settings_are_refused_for_a_causal_lm(
    overrides: list[str], expected: str
) -> None:
    cfg = load_config(None, ['model.task="causal-lm"', *overrides])
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert str(err.value).startswith(expected) and "allowed:" in str(err.value)
    check_config(load_config(None, ['model.task="causal-lm"']))  # the defaults are fine


def test_conversation_columns_are_a_causal_lm_s_only() -> None:
    keys = ['data.prompt_column="q"', 'data.response_column="a"']
    check_config(load_config(None, ['model.task="causal-lm"', *keys]))
    check_config(load_config(None, keys))  # "auto" may yet resolve to a causal LM
    with pytest.raises(ConfigError, match=r"^config: data.prompt_column = 'q' with model.task "
                       r"= 'text': prompt, response and messages columns are read only by a "
                       r"causal-lm task"):  # fmt: skip
        check_config(load_config(None, ['model.task="text"', *keys]))
    with pytest.raises(ConfigError, match=r"with model\.task = 'text'"):
        check_config(load_config(None, keys), task_for("text"))  # "auto" resolved to text
    with pytest.raises(ConfigError, match=r"data\.prompt_column = 'q' without "
                       r"data\.response_column"):  # fmt: skip
        load_config(None, ['data.prompt-column="q"'])
    with pytest.raises(ConfigError, match="one input format is read"):
        load_config(None, ['data.messages_column="m"', *keys])


# -- label-less data ----------------------------------------------------------------------------


def test_a_label_less_jsonl_is_one_class_split_iid_only(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"Define the word {w}.", "output": "a word"}
            for w in ["dog", "cat"] * 20]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = load_raw(DataConfig(name=str(path), partition="iid"), task, False)
    assert raw.label_names == ["all"] and raw.labels.tolist() == [0] * 40
    assert sum(len(v) for v in raw.splits.values()) == 40
    assert raw.inputs[0].prompt == (("user", "Define the word dog."),)
    for partition in ("dirichlet", "pathological"):
        with pytest.raises(ConfigError) as err:
            load_raw(DataConfig(name=str(path), partition=partition), task, False)
        assert str(err.value) == (
            f"data.partition = '{partition}': dataset '{path}' has no data.label_column = "
            "'label' to split its examples by class; allowed: partition = 'iid', or "
            "label_column naming a category column (its columns: instruction, output)"
        )
    # A category column, when named, is the class the partition skews by.
    with_topic = [dict(r, topic=r["instruction"].split()[-1]) for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in with_topic))
    raw = load_raw(DataConfig(name=str(path), label_column="topic"), task, False)
    assert raw.label_names == ["cat.", "dog."]
    # A classifier's missing label column stays an error.
    with pytest.raises(DataError, match=r"data\.label_column = 'label': dataset"):
        load_raw(DataConfig(name=str(path), text_column="output", partition="iid"),
                 task_for("text"), False)  # fmt: skip


# -- wordnet-definitions ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nouns() -> pd.DataFrame:
    return load_tables("wordnet-nouns", False)["all"]


def lemmas(table: pd.DataFrame) -> set[str]:
    found = table["instruction"].str.extract(r"^Define the word (.+)\.$")[0]
    assert not found.isna().any()
    return set(found.str.lower())


def test_wordnet_definitions_tests_on_held_out_words(nouns: pd.DataFrame) -> None:
    tables = load_tables("wordnet-definitions", False, None, DataConfig(split_seed=0))
    train, test = tables["train"], tables["test"]
    assert list(tables) == ["train", "test"]
    assert list(train.columns) == ["instruction", "output", "category"]
    assert len(train) + len(test) == len(nouns)
    all_lemmas = set(nouns["text"].str.split(": ", n=1).str[0].str.lower())
    held_out = lemmas(test)
    assert not held_out & lemmas(train)  # no test word was seen in training
    assert len(held_out) == round(0.1 * len(all_lemmas))
    # Every synset of a held-out word is in test: its rows in the source, counted directly.
    source_lemma = nouns["text"].str.split(": ", n=1).str[0].str.lower()
    assert int(source_lemma.isin(held_out).sum()) == len(test)
    assert set(train["category"]) == set(nouns["label"]) >= set(test["category"])
    assert len(set(nouns["label"])) == 26
    for table in (train, test):
        assert not table["output"].str.contains(r'[;:,]\s*"', regex=True).any()
        assert not (table["output"].str.strip() == "").any()
        assert not table["output"].str.endswith((";", " ")).any()
    both = pd.concat([train, test])
    defined = both.loc[both["instruction"] == "Define the word object.", "output"]
    assert "a tangible and visible entity; an entity that can cast a shadow" in set(defined)
    assert "the act of putting one thing or person in the place of another" in set(
        both.loc[both["instruction"] == "Define the word substitution.", "output"]
    )  # its gloss opens its example with ': "', not '; "'


def test_wordnet_definitions_draw_is_fixed_by_the_split_seed() -> None:
    def held_out(seed: int) -> set[str]:
        cfg = DataConfig(split_seed=seed)
        return lemmas(load_tables("wordnet-definitions", False, None, cfg)["test"])

    assert held_out(0) == held_out(0)
    assert held_out(1) != held_out(0)


def test_wordnet_definitions_loads_with_its_own_test_split_and_categories() -> None:
    cfg = DataConfig(name="wordnet-definitions", label_column="category", split_seed=3)
    raw = load_raw(cfg, task, False)
    assert len(raw.label_names) == 26 and raw.label_names[0].startswith("noun.")
    test = raw.splits["test"]
    train_validation = np.concatenate([raw.splits["train"], raw.splits["validation"]])
    test_words = {re.sub(r"^Define the word (.+)\.$", r"\1", raw.inputs[i].prompt[0][1]).lower()
                  for i in test}  # fmt: skip
    train_words = {re.sub(r"^Define the word (.+)\.$", r"\1", raw.inputs[i].prompt[0][1]).lower()
                   for i in train_validation}  # fmt: skip
    assert not test_words & train_words
    tables = load_tables("wordnet-definitions", False, None, cfg)
    assert len(test) == len(tables["test"])
    assert len(raw.splits["validation"]) == round(0.05 * len(tables["train"]))
