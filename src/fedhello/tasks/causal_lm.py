"""Causal language modelling: instruction tuning of a decoder (SmolLM2, Llama, Qwen, ...).

An example is a prompt and the answer the model should learn to give, read in one of three
formats (the first that the config or the table names):

- chat: ``data.messages_column`` (or, unset, a column named ``messages``) holds a list of
  ``{"role", "content"}`` turns; the **last assistant turn** is the answer, the turns before it
  (system, user, earlier assistant turns) the prompt; turns after it are dropped (counted in
  the log). A conversation without an assistant turn is an error naming its row;
- prompt/response columns: ``data.prompt_column`` (one user turn) and
  ``data.response_column``;
- Alpaca (the default when none of these is set): ``instruction``, an optional ``input``
  (appended to the instruction after a blank line when not empty) and ``output``.

The same content gives the same tokens in every format. Prompts are written with the
tokenizer's **own chat template** (``apply_chat_template(..., add_generation_prompt=True)``),
the answer being what the template writes after them when the assistant turn is rendered too,
ending with the template's end-of-turn token (the EOS token appended where the template ends
an answer with no special token), so that generation learns to stop. A tokenizer without a
chat template is refused in one line naming the model.

**Loss on the answer only**: each token's label is -100 on the prompt and the padding, the
token id on the answer's tokens; transformers' causal-LM models shift the labels themselves.
``model.max_length`` never cuts a prompt: an answer that does not fit is cut (keeping the
prompt whole and at least one answer token; how many were cut is logged), and a prompt that
does not fit with one answer token is an error (see :meth:`CausalLMTask.encode`).

The classes: a causal LM has no class to predict, but the partition splits examples by class.
``data.label_column`` may name a category column (``wordnet-definitions``: ``category``) whose
values the Dirichlet and pathological partitions skew the shards by; a dataset without that
column is one class (``UNLABELLED_CLASS``), which only ``data.partition = "iid"`` can split
(``fedhello.data.loading``, through ``unlabelled_class``).

Evaluation of this kind is the language model's loss and perplexity on the answers, and
generation from ``LMInputs.prompt_ids`` scored against ``LMInputs.references``; the
classification ``predictions`` and ``scores`` of :class:`~fedhello.tasks.base.Task` do not
apply to it (the evaluation wiring is the engine's).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhello.core.config import Config, DataConfig
from fedhello.core.errors import ConfigError, ModelError
from fedhello.tasks.base import Task
from fedhello.tasks.chat_template import check_chat_template, check_prompts_fit, render, tokens
from fedhello.tasks.lm_formats import Exchange, chat_rows, column_rows, input_format
from fedhello.tasks.lm_inputs import IGNORE, LMInputs

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

UNLABELLED_CLASS = "all"  # the one class of a dataset without data.label_column
# model_type values of decoder-only language models, for a config that names no architecture
# (a config built in code); a saved checkpoint names its class (``...ForCausalLM``).
DECODER_MODEL_TYPES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
    "gemma2", "gemma3_text", "phi", "phi3", "gpt2", "gpt_neox", "gptj", "opt", "falcon",
    "olmo", "olmo2", "granite", "stablelm", "starcoder2", "smollm3", "cohere", "bloom",
}  # fmt: skip


class CausalLMTask(Task):
    """Instruction tuning of a causal language model: the loss is on the answers' tokens."""

    name = "causal-lm"
    head = "CausalLM"
    uses_max_length = True
    generative = True  # scored by loss, perplexity and generation (fedhello.engine.generative)
    class_rows = False  # no new head: train.head and train.loss "auto" are federated, cross-entropy
    unlabelled_class = UNLABELLED_CLASS  # fedhello.data.loading: a dataset may have no classes

    # -- the config ---------------------------------------------------------------------------

    def check_config(self, cfg: Config) -> None:
        """No setting that only means something for a classifier: choice or text columns, a
        skew-aware loss, a head policy other than federated (there is no new head: the
        model's own LM head stays frozen, only LoRA trains), a forced pooling."""
        super().check_config(cfg)
        where = "with model.task = 'causal-lm'"
        if cfg.data.text_columns != ["text"]:
            raise ConfigError(
                f"config: data.text_column = {cfg.data.text_column!r} {where}: its inputs are "
                "the Alpaca columns (instruction, input, output), data.messages_column, or "
                "data.prompt_column and data.response_column; allowed: leave text_column "
                "unset"
            )
        if cfg.train.loss not in ("cross-entropy", "auto"):
            raise ConfigError(
                f"config: train.loss = {cfg.train.loss!r} {where}: that loss reweights class "
                "logits, and a language model predicts tokens; allowed: loss = 'cross-entropy' "
                "or 'auto'"
            )
        if cfg.train.loss == "auto" and cfg.train.calibration_tau != 1.0:
            raise ConfigError(
                f"config: train.calibration_tau = {cfg.train.calibration_tau} with train.loss "
                f"= 'auto' {where}: auto is cross-entropy here, which has no tau; allowed: "
                "its default 1.0"
            )
        if cfg.train.head not in ("federated", "auto"):
            raise ConfigError(
                f"config: train.head = {cfg.train.head!r} {where}: a language model gets no "
                "new head (its own LM head stays frozen and only LoRA is trained); allowed: "
                "head = 'federated' or 'auto'"
            )
        if cfg.model.pooling not in ("auto", "head"):
            raise ConfigError(
                f"config: model.pooling = {cfg.model.pooling!r} {where}: a pooling is what a "
                "classifier's head reads, and a language model predicts every next token; "
                "allowed: pooling = 'auto' or 'head'"
            )

    # -- the data -----------------------------------------------------------------------------

    def input_columns(self, cfg: DataConfig) -> list[tuple[str, str]]:
        """The configured columns; the Alpaca ones (under the keys that would replace them)
        when none is set. Which format a table is read in: :meth:`check_inputs`."""
        if cfg.messages_column is not None:
            return [(cfg.messages_column, "messages_column")]
        if cfg.prompt_column is not None and cfg.response_column is not None:
            return [(cfg.prompt_column, "prompt_column"), (cfg.response_column, "response_column")]
        return [("instruction", "prompt_column"), ("output", "response_column")]

    def check_inputs(self, table: Any, cfg: DataConfig) -> None:
        """One line for the first column ``table`` lacks, in the format it is read in."""
        input_format(table, cfg)

    def read_inputs(self, tables: Mapping[str, Any], cfg: DataConfig) -> Sequence[Any]:
        """One :class:`Exchange` per row of every table."""
        inputs: list[Exchange] = []
        dropped = 0
        for split, table in tables.items():
            form, columns = input_format(table, cfg)
            if form == "messages":
                rows, cut = chat_rows(table, columns[0], split, cfg.name)
                inputs.extend(rows)
                dropped += cut
            else:
                inputs.extend(column_rows(table, form, columns, cfg.name))
        if dropped:
            logger.info(
                "data %s: %d conversations end with turns after their last assistant turn "
                "(the answer); those turns are not used",
                cfg.name, dropped,
            )  # fmt: skip
        return inputs

    def encode(
        self,
        inputs: Sequence[Any],
        labels: torch.Tensor,
        processor: Any,
        max_length: int,
        augment: bool,
    ) -> LMInputs:
        """Every example's prompt and answer tokens (see the module's docstring).

        The prompt's tokens are an exact prefix of the example's: the prompt and the whole
        text are tokenised, and where the tokenizer merged across their boundary (rare: none of
        the 82k wordnet-definitions examples in SmolLM2's ChatML), the answer is tokenised on
        its own after the prompt's tokens (logged).

        The length rule: an answer is cut so that prompt + answer fit ``max_length``. Every
        prompt must fit with at least one answer token, else the whole encoding is one
        ConfigError naming how many do not and the length that would fit them all: an
        example whose prompt is cut or dropped would silently change what is learnt (or
        leave nothing to learn), and the fix is one setting that costs the short examples
        nothing (each batch is cut to its longest example).
        """
        exchanges: list[Exchange] = list(inputs)
        source = str(getattr(processor, "name_or_path", "") or type(processor).__name__)
        check_chat_template(processor, source)
        prompt_texts, completions = render(processor, exchanges, source)
        prompt_tok = tokens(processor, prompt_texts)
        full_tok = tokens(
            processor, [p + c for p, c in zip(prompt_texts, completions, strict=True)]
        )
        apart = [i for i, (p, f) in enumerate(zip(prompt_tok, full_tok, strict=True))
                 if f[: len(p)] != p]  # fmt: skip
        if apart:
            answers = tokens(processor, [completions[i] for i in apart])
            for i, answer in zip(apart, answers, strict=True):
                full_tok[i] = prompt_tok[i] + answer
            logger.info(
                "causal-lm: %d of %d examples tokenise across the prompt's end; their answers "
                "are tokenised after the prompt's tokens",
                len(apart), len(exchanges),
            )  # fmt: skip
        prompt_lengths = np.array([len(p) for p in prompt_tok], dtype=np.int64)
        lengths = np.array([len(f) for f in full_tok], dtype=np.int64)
        if len(exchanges) and (lengths <= prompt_lengths).any():
            raise ModelError(
                f"model {source!r}: its chat template writes an answer as no tokens "
                f"(example {int(np.argmax(lengths <= prompt_lengths))}); allowed: a template "
                "that writes the assistant's turn"
            )
        check_prompts_fit(prompt_lengths, max_length)
        cut = lengths > max_length
        if cut.any():
            logger.info(
                "causal-lm: %d of %d answers cut at model.max_length = %d (prompts kept whole; "
                "the longest example has %d tokens)",
                int(cut.sum()), len(lengths), max_length, int(lengths.max()),
            )  # fmt: skip
        kept = np.minimum(lengths, max_length)
        offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
        ids = np.fromiter(
            (t for f, n in zip(full_tok, kept, strict=True) for t in f[:n]),
            dtype=np.int64,
            count=int(offsets[-1]),
        )
        pad = getattr(processor, "pad_token_id", None)
        pad = getattr(processor, "eos_token_id", None) if pad is None else pad
        return LMInputs(
            ids, offsets, prompt_lengths, labels, [e.response for e in exchanges],
            int(pad or 0), int(cut.sum()),
        )  # fmt: skip

    # -- the model ----------------------------------------------------------------------------

    def detects(self, model_config: Mapping[str, Any]) -> bool:
        """A decoder-only language model: a ``...ForCausalLM`` architecture (or GPT-2-style
        ``...LMHeadModel`` of a decoder type); with no architecture named, a decoder
        ``model_type``. Encoders (BERT, MPNet: ``...ForMaskedLM``, ``BertLMHeadModel``) and
        encoder-decoders are not claimed."""
        if model_config.get("is_encoder_decoder"):
            return False
        architectures = [str(a) for a in model_config.get("architectures") or []]
        decoder = model_config.get("model_type") in DECODER_MODEL_TYPES
        if not architectures:
            return decoder
        return any(
            a.endswith("ForCausalLM") or (decoder and a.endswith("LMHeadModel"))
            for a in architectures
        )

    def load_processor(self, source: str, offline: bool) -> Any:
        """The model's tokenizer, which must have a chat template."""
        tokenizer = super().load_processor(source, offline)
        check_chat_template(tokenizer, source)
        return tokenizer

    def synthetic_batch(
        self, model: Any, batch_size: int, max_length: int, num_labels: int
    ) -> dict[str, torch.Tensor]:
        """``max_length`` random tokens per sequence (ids from 1000 up skip special tokens),
        no padding, the first quarter to half of each a prompt (label -100) and the rest its
        answer (labels = the tokens), as in real instruction data."""
        import torch

        gen = torch.Generator().manual_seed(0)
        vocab = int(getattr(model.config, "vocab_size", 32000))
        ids = torch.randint(min(1000, vocab - 1), vocab, (batch_size, max_length), generator=gen)
        low, high = max(1, max_length // 4), max(2, max_length // 2 + 1)
        prompt = torch.randint(low, high, (batch_size, 1), generator=gen)
        labels = ids.masked_fill(torch.arange(max_length)[None, :] < prompt, IGNORE)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
