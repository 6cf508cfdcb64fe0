"""The config sections that stand alone: the model, its LoRA adapters, the data, local
training, the federation's rounds and the run's bookkeeping.

Each section forbids unknown keys, so a misspelt key is an error rather than a silently
ignored setting; every field has a default and a help text (``fedhello validate`` prints
them). Pure python + pydantic: no torch.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedhello.core.aggregation import Weighting
from fedhello.core.server_optimizers import OPTIMIZERS, OptimizerName, default_server_lr

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


class TrainConfig(Section):
    local_steps: int = Field(10, ge=1, description="optimizer steps per client per round")
    local_epochs: float | None = Field(
        None, gt=0, description="if set, passes over the client's data instead of local_steps"
    )
    batch_size: int = Field(32, ge=1, description="examples per local step")
    lr: float = Field(
        5e-3,
        gt=0,
        description="local learning rate (LoRA and head); SGD typically needs a larger one "
        "than AdamW (about 0.05-0.1 for a LoRA adapter and a linear head)",
    )
    weight_decay: float = Field(
        0.0, ge=0, description="weight decay (AdamW: decoupled; SGD: L2 added to the gradient)"
    )
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw",
        description="local optimizer, built fresh every round: adamw (two fp32 moments per "
        "trainable parameter; fast on IID or mild skew) or sgd (momentum: one moment, else "
        "none; under label skew its push on absent classes fades as their probability goes "
        "to 0, where a fresh AdamW moves every coordinate by about lr)",
    )
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd: momentum (0: plain SGD)")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum (needs momentum > 0)")
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="adamw: the moments' decay rates [beta1, beta2], each in [0, 1)"
    )
    eps: float = Field(1e-8, gt=0, description="adamw: term added to the denominator")
    proximal_mu: float = Field(
        0.0,
        ge=0,
        description="FedProx: mu/2 ||w - w_global||^2 over the tensors a client trains (head "
        "included) added to its local loss (0: off)",
    )
    loss: Literal["cross-entropy", "restricted-softmax", "logit-adjusted"] = Field(
        "cross-entropy",
        description="local training loss (evaluation always uses cross-entropy): "
        "restricted-softmax (FedRS: the logits of classes absent from the client's shard "
        "times restricted_alpha) or logit-adjusted (FedLC: calibration_tau * n_c^(-1/4) "
        "subtracted from class c's logit, n_c the shard's count, 1e-8 for an absent class); "
        "classification tasks only",
    )
    restricted_alpha: float = Field(
        0.5, ge=0, le=1, description="restricted-softmax: factor on absent classes' logits"
    )
    calibration_tau: float = Field(1.0, gt=0, description="logit-adjusted: the margin's scale tau")
    head: Literal["federated", "frozen", "class-means", "local"] = Field(
        "federated",
        description="the classification head: federated (every client trains and uploads it, "
        "the server averages it), frozen (FedBABU: kept at its initialisation while LoRA "
        "trains), class-means (FedNCM: built before round 1 from the clients' per-class mean "
        "features, w_c = mu_c / ||mu_c||, bias 0, then frozen) or local (the Fed-HeLLo "
        "authors' code: clients train it but never upload it, so the global model is "
        "evaluated with its initial head)",
    )
    head_finetune_rounds: int = Field(
        0,
        ge=0,
        description="frozen and class-means: the last rounds in which the head is trained and "
        "averaged as federated (FedBABU's fine-tuning; class-means with all rounds is FedNCM-FT)",
    )
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
    gradient_checkpointing: bool = Field(
        False,
        strict=True,
        description="recompute each block's activations in the backward pass instead of "
        "keeping them (transformers' gradient checkpointing, non-reentrant): less memory per "
        "trained block, about one more forward of time; the cost profile measures both, so "
        "memory budgets afford more layers with it. Blocks below the lowest trained one are "
        "neither kept nor recomputed either way",
    )
    deterministic: bool = Field(
        False,
        strict=True,
        description="deterministic kernels (PyTorch's deterministic mode, cuBLAS's fixed "
        "workspace, no TF32, cuDNN without autotuning): CUDA runs repeat bit for bit, so a "
        "resumed run equals the uninterrupted one and Flower's simulation the embedded engine "
        "exactly; slower. false: on a GPU these hold to rounding only; a CPU repeats bit for "
        "bit either way. Set by the process's entry point (fedhello.model.determinism)",
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

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError("allowed: two decay rates, each in [0, 1)")
        return value

    @model_validator(mode="after")
    def _optimizer_settings(self) -> TrainConfig:
        """Settings of the other optimizer (or loss) are refused rather than ignored (compared
        with the defaults, so a saved config that spells every default out loads)."""
        if self.optimizer == "adamw" and (self.momentum or self.nesterov):
            nesterov = str(self.nesterov).lower()
            raise ValueError(
                f"train.momentum = {self.momentum}, train.nesterov = {nesterov} with "
                "train.optimizer = 'adamw': they are SGD's; allowed: optimizer = 'sgd', or "
                "momentum = 0 and nesterov = false"
            )
        if self.optimizer == "sgd" and (tuple(self.betas) != (0.9, 0.999) or self.eps != 1e-8):
            raise ValueError(
                f"train.betas = {list(self.betas)}, train.eps = {self.eps} with "
                "train.optimizer = 'sgd': they are AdamW's; allowed: optimizer = 'adamw', or "
                "their defaults"
            )
        if self.nesterov and not self.momentum:
            raise ValueError(
                "train.nesterov = true with train.momentum = 0: Nesterov needs momentum; "
                "allowed: momentum > 0, or nesterov = false"
            )
        if self.loss != "restricted-softmax" and self.restricted_alpha != 0.5:
            raise ValueError(
                f"train.restricted_alpha = {self.restricted_alpha} with train.loss = "
                f"{self.loss!r}: it is restricted-softmax's; allowed: loss = "
                "'restricted-softmax', or its default 0.5"
            )
        if self.loss != "logit-adjusted" and self.calibration_tau != 1.0:
            raise ValueError(
                f"train.calibration_tau = {self.calibration_tau} with train.loss = "
                f"{self.loss!r}: it is logit-adjusted's; allowed: loss = 'logit-adjusted', or "
                "its default 1.0"
            )
        if self.head_finetune_rounds and self.head in ("federated", "local"):
            raise ValueError(
                f"train.head_finetune_rounds = {self.head_finetune_rounds} with train.head = "
                f"{self.head!r}: it fine-tunes a frozen head; allowed: head = 'frozen' or "
                "'class-means', or 0"
            )
        return self

    @property
    def optimizer_moments(self) -> int:
        """fp32 tensors of optimizer state per trainable parameter: AdamW 2, SGD with
        momentum 1, plain SGD 0 (``fedhello.model.meters.train_memory_mb`` counts them)."""
        if self.optimizer == "adamw":
            return 2
        return 1 if self.momentum else 0

    @property
    def state_per_param(self) -> int:
        """fp32 tensors kept per trainable parameter besides its gradient: the optimizer's
        moments, plus FedProx's copy of the global weights when ``proximal_mu > 0``."""
        return self.optimizer_moments + (1 if self.proximal_mu > 0 else 0)


class FederationConfig(Section):
    """The rounds, how the server weighs the uploads (``weighting``) and moves the global
    state towards their means (``server_optimizer``: ``fedhello.core.server_optimizers``).

    Older configs still load: ``weighted = true`` / ``false`` is ``weighting = "shard"`` /
    ``"uniform"``; ``server_momentum > 0`` without ``server_optimizer`` is ``fedavgm``. An
    unset ``server_lr`` takes its optimizer's default (1.0 for fedavg and fedavgm, 0.1 for the
    adaptive ones), and the resolved config (a run's ``config.toml``) holds that value."""

    rounds: int = Field(15, ge=1, description="communication rounds")
    weighting: Weighting = Field(
        "shard",
        description="each client's weight in the per-tensor means: shard (the examples in its "
        "shard, FedAvg's n_k), uniform (1 each: the Fed-HeLLo authors' protocol) or "
        "examples-seen (the examples it trained on this round, local steps x batch size: "
        "uniform with fixed local steps, the work done with local epochs); replaces "
        "weighted (true: shard, false: uniform)",
    )
    server_optimizer: OptimizerName = Field(
        "fedavg",
        description="the server's step on the mean update delta of each tensor trained this "
        "round: fedavg (x += server_lr delta), fedavgm (momentum server_momentum), fedadam, "
        "fedyogi, fedadagrad (FedOpt, Reddi et al. 2021: server_beta1, server_beta2, "
        "server_tau); a tensor nobody trained keeps its value and its moments. Default: "
        "fedavgm where server_momentum > 0, else fedavg",
    )
    server_lr: float | None = Field(
        None,
        gt=0,
        description="server step size eta (default: 1.0 for fedavg and fedavgm, the average "
        "itself; 0.1 for fedadam, fedyogi and fedadagrad, Flower's)",
    )
    server_momentum: float = Field(
        0.0, ge=0, lt=1, description="fedavgm: momentum beta, v = beta v + delta (0: fedavg)"
    )
    server_beta1: float = Field(
        0.9, ge=0, lt=1, description="fedadam, fedyogi, fedadagrad: first-moment decay b1"
    )
    server_beta2: float = Field(
        0.99, ge=0, lt=1, description="fedadam, fedyogi: second-moment decay b2"
    )
    server_tau: float = Field(
        1e-3,
        gt=0,
        description="fedadam, fedyogi, fedadagrad: adaptivity tau in eta m / (sqrt(v) + tau); "
        "v starts at tau^2",
    )
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
    generate_every: int = Field(
        0,
        ge=0,
        description="causal-lm: greedy generation on the generation subset every N rounds, "
        "scored by ROUGE-L and exact match (0: at the end only; it costs far more than the "
        "per-round loss and perplexity)",
    )
    generate_examples: int = Field(
        100,
        ge=1,
        description="causal-lm: how many test prompts (a fixed subset) are answered by greedy "
        "generation, each round it generates and at the end (also the zero-shot reference)",
    )
    max_new_tokens: int = Field(
        48, ge=1, description="causal-lm: most tokens a generated answer may have"
    )
    client_cpus: int = Field(
        0,
        ge=0,
        description="Flower simulation: CPU cores per virtual client (0: all cores, one "
        "client at a time; with a GPU share, cores // (GPUs / client_gpus), so that the GPU "
        "share limits how many run at once). Ray runs min(cores // client_cpus, "
        "GPUs // client_gpus) at once; the run log says how many",
    )
    client_gpus: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Flower simulation: GPU share per virtual client, e.g. 0.25 = four "
        "clients train on a GPU at once (with client_cpus 0 or at most cores / 4). Default: "
        "1 where train.device finds CUDA, else 0; 0 with train.device = cuda is refused (Ray "
        "hides the GPUs from a client that asks for none). A client sees its GPU as cuda:0",
    )

    @model_validator(mode="before")
    @classmethod
    def _older_keys(cls, data: Any) -> Any:
        """``weighted`` into ``weighting``; the optimizer and its step size where unset."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "weighted" in data:
            weighted = data.pop("weighted")
            if not isinstance(weighted, bool):
                raise ValueError(
                    f"federation.weighted = {weighted!r}: allowed: true (weighting = 'shard') "
                    "or false ('uniform'); better: federation.weighting"
                )
            meant = "shard" if weighted else "uniform"
            given = data.get("weighting")
            if given is not None and given != meant:
                raise ValueError(
                    f"federation.weighted = {str(weighted).lower()} (weighting = {meant!r}) "
                    f"contradicts federation.weighting = {given!r}: give only weighting "
                    "(examples-seen, shard or uniform)"
                )
            data["weighting"] = meant
        momentum = data.get("server_momentum", 0.0)
        if data.get("server_optimizer") is None:
            moving = isinstance(momentum, int | float) and momentum > 0
            data["server_optimizer"] = "fedavgm" if moving else "fedavg"
        if data.get("server_lr") is None and data["server_optimizer"] in OPTIMIZERS:
            data["server_lr"] = default_server_lr(data["server_optimizer"])
        return data

    @model_validator(mode="after")
    def _momentum_is_fedavgm_s(self) -> FederationConfig:
        if self.server_momentum > 0 and self.server_optimizer != "fedavgm":
            raise ValueError(
                f"federation.server_momentum = {self.server_momentum:g} with "
                f"federation.server_optimizer = {self.server_optimizer!r}: momentum is "
                "FedAvgM's; allowed: server_optimizer = 'fedavgm', or server_momentum = 0"
            )
        return self

    @property
    def eta(self) -> float:
        """The server step size: ``server_lr``, or its optimizer's default where unset."""
        return (
            default_server_lr(self.server_optimizer) if self.server_lr is None else self.server_lr
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
