"""The config sections that stand alone: the model, its LoRA adapters, the data, local
training, the federation's rounds and the run's bookkeeping.

Each section forbids unknown keys, so a misspelt key is an error rather than a silently
ignored setting; every field has a default and a help text (``fedhello validate`` prints
them). Pure python + pydantic: no torch.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEVICE_FORM = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(
        "minilm-l6", description="registry name (minilm-l6), local folder or hub name"
    )
    # A plain name here: the kinds are a registry above the core (fedhello.tasks), which
    # checks the name and the kind's own settings where a config is used.
    task: str = Field(
        "auto",
        min_length=1,
        description="auto: image for vision model types, else text (sequence classification); "
        "text, image, multiple-choice (one score per choice, data.choice_columns, the right "
        "one is the label), or a kind registered with fedhello.tasks.register_task",
    )
    max_length: int = Field(32, ge=4, le=4096, description="text: tokens per example (truncated)")
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
        "label", description="column with the class label (multiple-choice: the right choice)"
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
    def _fractions(self) -> DataConfig:
        if self.test_fraction + self.validation_fraction >= 0.9:
            raise ValueError(
                f"data.test_fraction + data.validation_fraction = "
                f"{self.test_fraction + self.validation_fraction:g}: must leave at least 10% "
                "for training"
            )
        return self


class TrainConfig(Section):
    local_steps: int = Field(10, ge=1, description="optimizer steps per client per round")
    local_epochs: float | None = Field(
        None, gt=0, description="if set, passes over the client's data instead of local_steps"
    )
    batch_size: int = Field(32, ge=1, description="examples per local step")
    lr: float = Field(5e-3, gt=0, description="AdamW learning rate (LoRA and head)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    lr_schedule: Literal["constant", "linear", "cosine", "exponential"] = Field(
        "cosine",
        description="learning rate over rounds: linear and cosine decay to lr_min_factor * lr; "
        "exponential multiplies it by lr_decay every round (the authors')",
    )
    lr_min_factor: float = Field(0.1, ge=0, le=1, description="final lr / lr for decays")
    lr_decay: float = Field(
        0.99, gt=0, le=1, description="exponential: the factor applied every round"
    )
    max_grad_norm: float = Field(1.0, ge=0, description="gradient-norm clipping (0: off)")
    eval_batch_size: int = Field(64, ge=1, description="examples per evaluation batch")
    device: str = Field(
        "auto", description="auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="compute precision: autocast dtype (auto: fastest safe on the device)"
    )
    base_precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="storage of the frozen base weights: fp32 or the compute precision "
        "(auto: the compute precision on an accelerator, fp32 on a CPU)",
    )

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str) -> str:
        if not DEVICE_FORM.fullmatch(value):
            raise ValueError("allowed: auto, cpu, cuda, cuda:N (N = 0, 1, ...), mps")
        return value

    @model_validator(mode="after")
    def _base_precision(self) -> TrainConfig:
        explicit = self.precision not in ("auto", "fp32")
        base = self.base_precision
        if base not in ("auto", "fp32") and (
            self.precision == "fp32" or (explicit and base != self.precision)
        ):
            raise ValueError(
                f"train.base_precision = {base!r} with train.precision = {self.precision!r}: "
                "allowed: auto, fp32 or the compute precision"
            )
        return self


class FederationConfig(Section):
    rounds: int = Field(15, ge=1, description="communication rounds")
    weighted: bool = Field(True, description="weight client updates by their example counts")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="FedAvgM momentum (0: FedAvg)")
    server_lr: float = Field(1.0, gt=0, description="server step size on the averaged update")
    eval_every: int = Field(1, ge=1, description="evaluate the global model every N rounds")
    min_replies: int = Field(
        1, ge=1, description="Flower: fewest valid replies a round needs to update the model"
    )
    round_timeout: float = Field(
        600.0, gt=0, description="Flower: seconds to wait for the replies of a round"
    )
    node_wait: float = Field(
        300.0, gt=0, description="Flower: seconds to wait for the SuperNodes to connect"
    )
    eval_examples: int = Field(
        1000, ge=1, description="per-round evaluation on a fixed subset of test/validation"
    )
    client_cpus: int = Field(
        0, ge=0, description="Flower simulation: CPU cores per virtual client (0: all cores)"
    )
    client_gpus: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Flower simulation: GPU share per virtual client, e.g. 0.25 = four share "
        "a GPU (default: 1 where train.device finds CUDA, else 0)",
    )


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
