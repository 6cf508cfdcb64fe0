"""The config sections that stand alone: the model, its LoRA adapters, the data and the run's
bookkeeping (local training is ``training``, the federation's rounds ``federation``), and the
``Section`` base they all share.

Each section forbids unknown keys, so a misspelt key is an error rather than a silently
ignored setting; every field has a default and a help text (``fedhello validate`` prints
them). Pure python + pydantic: no torch.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

DEVICE_FORM = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """A boolean where a number is meant is refused: pydantic would read ``rounds = true``
        as 1 and ``lr = true`` as 1.0 (a boolean setting refuses a number the same way)."""
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _numeric(field.annotation) and _holds_bool(value):
            raise ValueError("a boolean; allowed: a number")
        return value


def _numeric(annotation: Any) -> bool:
    """Whether ``annotation`` reads numbers (int, float, or lists/options of them), not bools."""
    if annotation is bool:
        return False
    if annotation in (int, float):
        return True
    return any(_numeric(arg) for arg in get_args(annotation))


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, list | tuple) and any(isinstance(v, bool) for v in value)


class ModelConfig(Section):
    name: str = Field(
        "minilm-l6", description="registry name (minilm-l6), local folder or hub name"
    )
    # A plain name here: the kinds are a registry above the core (fedhello.tasks), which
    # checks the name and the kind's own settings where a config is used.
    task: str = Field(
        "auto",
        min_length=1,
        description="auto: image for vision model types, causal-lm for decoder LLMs "
        "(*ForCausalLM), else text (sequence classification); text, image, multiple-choice "
        "(one score per choice, data.choice_columns, the right one is the label), causal-lm "
        "(instruction tuning: loss on the answers, scored by perplexity and ROUGE-L), or a kind "
        "registered with fedhello.tasks.register_task",
    )
    max_length: int = Field(32, ge=4, le=4096, description="text: tokens per example (truncated)")
    pooling: Literal["auto", "mean", "cls", "max", "head"] = Field(
        "auto",
        description="what the classifier reads the encoder through: auto (the pooling the model "
        "declares, e.g. sentence-transformers' mean; else the masked mean where the head would "
        "read a never-trained pooler; else the model's own head), mean, cls or max of the token "
        "states (text and multiple choice), or head (transformers' head as built, its pooler "
        "frozen: how runs before this setting were made)",
    )
    allow_download: bool = Field(False, description="allow hub downloads (off: offline, fail fast)")


class LoraSection(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(
        16.0,
        gt=0,
        description="LoRA scaling alpha: every module is scaled by alpha / r with the global "
        "r, also where a rank method's client trains a lower-rank slice",
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        ["auto"],
        min_length=1,
        description="module names that get LoRA in every block; auto: the attention query "
        "and value projections (query/value in BERT, q_proj/v_proj in ViT and Llama)",
    )
    freeze_a: bool = Field(
        False,
        description="FFA-LoRA: keep every A at its shared initialisation, train and average "
        "only B (exact aggregation); with any strategy but flexlora",
    )


class DataConfig(Section):
    name: str = Field("wordnet-nouns", description="registry name, local file/folder or hub name")
    subset: str | None = Field(
        None, description="the hub dataset's configuration (subset), e.g. ledgar or eng_Latn"
    )
    text_column: str | list[str] = Field(
        "text",
        description="column with the input text, or two columns tokenised as a sentence pair "
        '(e.g. ["question1", "question2"])',
    )
    image_column: str = Field("image", description="column with the input image")
    label_column: str = Field(
        "label",
        description="column with the class label (multiple-choice: the right choice; "
        "causal-lm: an optional category the clients' shards are split by, absent: one class "
        "and partition = iid)",
    )
    augment: bool = Field(
        True,
        description="images: train on RandomResizedCrop to the model's size and horizontal "
        "flips, seeded by (seed, round, client, step); evaluation always resizes only",
    )
    context_column: str | None = Field(
        None, description="multiple-choice: the passage every choice is read with"
    )
    question_column: str | None = Field(
        None, description="multiple-choice: the question, read before each choice"
    )
    choice_columns: list[str] = Field(
        [], description="multiple-choice: one column per answer choice, in order"
    )
    answer_base: Literal[0, 1] = Field(
        0,
        description="multiple-choice: the label of the first choice (Belebele numbers its "
        "answers from 1)",
    )
    prompt_column: str | None = Field(
        None,
        description="causal-lm: the column of prompts, answered by data.response_column (unset "
        "with messages_column unset: the Alpaca columns instruction, optional input, output)",
    )
    response_column: str | None = Field(
        None, description="causal-lm: the column of the answers to data.prompt_column"
    )
    messages_column: str | None = Field(
        None,
        description="causal-lm: the column of chat conversations (lists of {role, content}); "
        "the last assistant turn is the answer (unset: a 'messages' column is found by name)",
    )
    test_fraction: float = Field(0.1, gt=0, lt=1, description="share held out for the test split")
    validation_fraction: float = Field(0.05, ge=0, lt=1, description="share for validation")
    split_seed: int = Field(0, ge=0, description="seed of the fixed train/validation/test split")
    max_train_examples: int | None = Field(None, ge=1, description="cap on the training pool")
    partition: Literal["iid", "pathological", "dirichlet"] = Field(
        "dirichlet", description="how the training pool is split across clients"
    )
    dirichlet_alpha: float = Field(0.5, gt=0, description="Dirichlet label-skew concentration")
    classes_per_client: int = Field(5, ge=1, description="pathological: classes per client (k)")

    @field_validator("text_column")
    @classmethod
    def _one_or_two(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not 1 <= len(v) <= 2:
            raise ValueError(
                f"data.text_column = {v}: give one column or a pair of columns "
                "(a sentence-pair task)"
            )
        return v[0] if isinstance(v, list) and len(v) == 1 else v

    @property
    def text_columns(self) -> list[str]:
        """The text column, or the two columns of a sentence pair."""
        return [self.text_column] if isinstance(self.text_column, str) else self.text_column

    @model_validator(mode="after")
    def _conversation_columns(self) -> DataConfig:
        """A prompt needs its answer's column, and one input format is read, not two."""
        if (self.prompt_column is None) != (self.response_column is None):
            given, missing = (
                ("prompt_column", "response_column")
                if self.response_column is None
                else ("response_column", "prompt_column")
            )
            raise ValueError(
                f"data.{given} = {getattr(self, given)!r} without data.{missing}: a prompt "
                f"column is read with its answers' column; allowed: both, or neither"
            )
        if self.messages_column is not None and self.prompt_column is not None:
            raise ValueError(
                f"data.messages_column = {self.messages_column!r} with data.prompt_column = "
                f"{self.prompt_column!r}: one input format is read; allowed: messages_column, "
                "or prompt_column and response_column"
            )
        return self

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.test_fraction + self.validation_fraction >= 0.9:
            raise ValueError(
                f"data.test_fraction + data.validation_fraction = "
                f"{self.test_fraction + self.validation_fraction:g}: must leave at least 10% "
                "for training"
            )
        return self


class RunConfig(Section):
    name: str | None = Field(None, description="run directory name (default: derived)")
    out_dir: str = Field("runs", description="parent folder of run directories")

    seed: int = Field(0, ge=0, description="the seed every random choice derives from")
    threads: int = Field(0, ge=0, description="torch threads (0: torch's default)")
    checkpoint_every: int = Field(
        1, ge=1, description="write a resumable checkpoint every N rounds"
    )
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep")
    profile_dir: str | None = Field(
        None,
        description="where measured cost profiles are kept and reused (default: "
        "<out_dir>/profiles)",
    )

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str | None) -> str | None:
        """The run's folder inside ``out_dir``: one name, never a path out of it."""
        if name is not None and (not name or "/" in name or "\\" in name or name in (".", "..")):
            raise ValueError(
                "allowed: one folder name (no '/' or '\\', not '.' or '..'); out_dir sets where"
            )
        return name
