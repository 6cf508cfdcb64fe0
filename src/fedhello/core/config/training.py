"""The ``[train]`` section: local training on each client (steps, batch, learning rate and its
schedule, the optimizer, precision and device, the head policy and skew-aware losses).

Forbids unknown keys like every section (``fedhello.core.config.sections.Section``). Pure
python + pydantic: no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fedhello.core.config.sections import DEVICE_FORM, Section


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
    loss: Literal["auto", "cross-entropy", "restricted-softmax", "logit-adjusted"] = Field(
        "auto",
        description="local training loss (evaluation always uses cross-entropy): auto "
        "(logit-adjusted for a classifier with a row per class, else cross-entropy: the label "
        "skew recipe of docs/RESULTS.md section 6), cross-entropy, restricted-softmax (FedRS: "
        "the logits of classes absent from the client's shard times restricted_alpha) or "
        "logit-adjusted (FedLC: calibration_tau * n_c^(-1/4) subtracted from class c's logit, "
        "n_c the shard's count, 1e-8 for an absent class); the skew-aware ones for "
        "classification tasks only",
    )
    restricted_alpha: float = Field(
        0.5, ge=0, le=1, description="restricted-softmax: factor on absent classes' logits"
    )
    calibration_tau: float = Field(1.0, gt=0, description="logit-adjusted: the margin's scale tau")
    head: Literal["auto", "federated", "frozen", "class-means", "local"] = Field(
        "auto",
        description="the classification head: auto (class-means then trained every round, "
        "FedNCM-FT, for a classifier whose head is one linear layer with a row per class and "
        "no privacy section; else federated: the label skew recipe of docs/RESULTS.md section "
        "6), federated (every client trains and uploads it, the server averages it), frozen "
        "(FedBABU: kept at its initialisation while LoRA trains), class-means (FedNCM: built "
        "before round 1 from the clients' per-class mean features, w_c = mu_c / ||mu_c||, "
        "bias 0, then frozen) or local (the Fed-HeLLo authors' code: clients train it but "
        "never upload it, so the global model is evaluated with its initial head)",
    )
    head_finetune_rounds: int | Literal["all"] = Field(
        0,
        description="frozen and class-means: the last rounds in which the head is trained and "
        "averaged as federated (FedBABU's fine-tuning), 0..federation.rounds, or all "
        "(class-means with all is FedNCM-FT, whatever the rounds)",
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

    @field_validator("head_finetune_rounds", mode="before")
    @classmethod
    def _finetune_rounds_form(cls, value: object) -> object:
        """One line for a value that is neither a round count nor ``all`` (pydantic would name
        the branch of the union it tried first)."""
        if value == "all" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        ):
            return value
        raise ValueError("allowed: a round count 0..federation.rounds, or 'all'")

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
        # auto is logit-adjusted or cross-entropy, never restricted-softmax
        if self.loss != "restricted-softmax" and self.restricted_alpha != 0.5:
            raise ValueError(
                f"train.restricted_alpha = {self.restricted_alpha} with train.loss = "
                f"{self.loss!r}: it is restricted-softmax's; allowed: loss = "
                "'restricted-softmax', or its default 0.5"
            )
        if self.loss not in ("logit-adjusted", "auto") and self.calibration_tau != 1.0:
            raise ValueError(
                f"train.calibration_tau = {self.calibration_tau} with train.loss = "
                f"{self.loss!r}: it is logit-adjusted's; allowed: loss = 'logit-adjusted', or "
                "its default 1.0"
            )
        if self.head_finetune_rounds and self.head in ("federated", "local", "auto"):
            raise ValueError(
                f"train.head_finetune_rounds = {self.head_finetune_rounds!r} with train.head = "
                f"{self.head!r}: it fine-tunes a frozen head (auto chooses its own); allowed: "
                "head = 'frozen' or 'class-means', or 0"
            )
        return self

    def finetune_rounds(self, rounds: int) -> int:
        """How many of a run's last ``rounds`` train the head under ``frozen`` or
        ``class-means``: ``head_finetune_rounds``, with ``all`` every one of them."""
        if self.head_finetune_rounds == "all":
            return rounds
        return min(self.head_finetune_rounds, rounds)

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
