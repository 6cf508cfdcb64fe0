"""The typed, validated experiment config: TOML file + dotted ``--set`` overrides.

Every field has a default and a help text, so ``fedhello run`` with no file runs the default
experiment. Unknown keys and bad values raise :class:`ConfigError` with one line naming the key,
the value and what is allowed. Pure python + pydantic: no torch.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from fedhello.core.allocation import (
    StrategyOptions,
    option_owners,
    strategy_class,
    strategy_names,
    strategy_options,
)
from fedhello.core.errors import ConfigError

DEVICE_FORM = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(
        "minilm-l6", description="registry name (minilm-l6), local folder or hub name"
    )
    task: Literal["auto", "text", "image", "multiple-choice"] = Field(
        "auto",
        description="auto: image for vision model types, else text (sequence classification); "
        "multiple-choice: one score per choice (data.choice_columns), the right one is the label",
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


BUDGET_UNITS = {"layers": "a fraction of the LoRA layers", "memory-mb": "MB of training memory",
                "step-seconds": "seconds per local step"}  # fmt: skip


class ClientsConfig(Section):
    num_clients: int = Field(12, ge=1, description="K: number of clients")
    per_round: int = Field(6, ge=1, description="m: clients sampled per round")
    budget_kind: Literal["layers", "memory-mb", "step-seconds"] = Field(
        "layers",
        description="unit of tiers and budgets: layers (the paper's: a fraction of the LoRA "
        "layers, or a count in budgets), memory-mb (training memory: saved activations, "
        "gradients and optimizer state) or step-seconds (time of one local step); the real "
        "units are checked against the measured cost profile (fedhello calibrate)",
    )
    tiers: list[float] = Field(
        [0.5, 0.75, 1.0],
        min_length=1,
        description="equal-size resource tiers, in the unit of budget_kind",
    )
    budgets: list[int | float] | None = Field(
        None,
        description="per-client budgets in the unit of budget_kind (overrides tiers; one per "
        "client; layers: a count)",
    )
    upload_mb: list[float] | None = Field(
        None,
        description="optional upload limit per round, MB per tier (one per tier): caps how "
        "many LoRA layers a client of the tier may send",
    )
    tier_kind: Literal["layers", "cost", "memory"] = Field(
        "layers",
        description="legacy, with budget_kind = layers: cost or memory tiers are fractions of "
        "the step time or activation memory of training every layer, turned into a layer "
        "count that fits only if the layers sit at the top (not enforced: use budget_kind)",
    )

    @model_validator(mode="after")
    def _counts(self) -> ClientsConfig:
        if self.per_round > self.num_clients:
            raise ValueError(
                f"clients.per_round = {self.per_round}: must be at most "
                f"clients.num_clients = {self.num_clients}"
            )
        kind = self.budget_kind
        if kind == "layers":
            bad = [t for t in self.tiers if not 0 < t <= 1]
            if bad:
                raise ValueError(
                    f"clients.tiers = {self.tiers}: {bad[0]:g} is not a fraction in (0, 1] of "
                    "the LoRA layers (budget_kind = layers); give real limits with "
                    "clients.budget_kind = memory-mb or step-seconds"
                )
        else:
            bad = [t for t in self.tiers if not t > 0]
            if bad:
                raise ValueError(
                    f"clients.tiers = {self.tiers}: {bad[0]:g} is not a positive limit in "
                    f"{BUDGET_UNITS[kind]} (budget_kind = {kind})"
                )
            if self.tier_kind != "layers":
                raise ValueError(
                    f"clients.tier_kind = {self.tier_kind!r} with clients.budget_kind = "
                    f"{kind!r}: tier_kind applies only to layer budgets; allowed: layers"
                )
        if self.budgets is not None:
            if len(self.budgets) != self.num_clients:
                raise ValueError(
                    f"clients.budgets has {len(self.budgets)} entries: needs one per client "
                    f"(clients.num_clients = {self.num_clients})"
                )
            if kind == "layers" and any(b != int(b) or b < 1 for b in self.budgets):
                raise ValueError(
                    f"clients.budgets = {self.budgets}: every layer budget must be a whole "
                    "number >= 1"
                )
            if any(b <= 0 for b in self.budgets):
                raise ValueError(
                    f"clients.budgets = {self.budgets}: every budget must be positive "
                    f"({BUDGET_UNITS[kind]})"
                )
        if self.upload_mb is not None:
            if len(self.upload_mb) != len(self.tiers):
                raise ValueError(
                    f"clients.upload_mb has {len(self.upload_mb)} entries: needs one per tier "
                    f"(clients.tiers has {len(self.tiers)})"
                )
            if any(u <= 0 for u in self.upload_mb):
                raise ValueError(f"clients.upload_mb = {self.upload_mb}: limits must be positive")
        return self

    @property
    def real_budgets(self) -> bool:
        """Whether budgets are limits in real units, checked against a cost profile."""
        return self.budget_kind != "layers"


class AllocationConfig(Section):
    """The allocation strategy and its options.

    Besides the keys below, the section holds the chosen strategy's own options (each
    strategy declares them as a typed model: ``fedhello.core.allocation.options``), written
    flat: ``shape``, ``sampler``, ``fisher-warmup`` ... ``cfg.allocation.options`` is that model,
    validated, every default filled in. A key no strategy declares is an error. A key that
    another strategy declares (``shape`` under ``fedra``) is kept but does not apply: the run
    log warns about it (``foreign_options``). One config file may serve several strategies (a
    comparison's base config, ``--set allocation.strategy=...`` on a file written for another
    strategy), and run folders written before options were typed hold every option.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    strategy: str = Field("fedra", description="allocation strategy name (fedhello plan --help)")
    proxy_examples: int = Field(
        256,
        ge=1,
        description="server proxy set for Fisher scores, held out of the training pool for "
        "every strategy (so that all strategies of a comparison see the same client shards)",
    )
    fisher_batch_size: int = Field(
        32, ge=1, description="proxy examples per batch when the server computes Fisher scores"
    )
    fit: Literal["auto", "repair", "strict", "off"] = Field(
        "auto",
        description="a layer set that exceeds its client's limit (real budgets): repair (move "
        "its shallowest layers up, drop layers only if that is not enough), strict (stop with "
        "an error) or off (the paper's semantics: count only, not enforced); auto: repair with "
        "real budgets, off with layer budgets",
    )
    client_model: Literal["full", "subnetwork"] = Field(
        "full",
        description="what a client runs: the full model (the paper's: backward stops at the "
        "lowest trained block, forward runs them all), or subnetwork (FedRA's own code: only "
        "its allocated blocks, in order, so the forward skips the others); layer strategies",
    )
    _options: StrategyOptions = PrivateAttr(default_factory=StrategyOptions)

    @field_validator("strategy")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in strategy_names():
            raise ValueError(f"unknown strategy; choose one of: {', '.join(strategy_names())}")
        return v

    @model_validator(mode="after")
    def _strategy_options(self) -> AllocationConfig:
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        owners = option_owners()
        unknown = [k for k in extra if k not in owners]
        if unknown:
            own = list(strategy_class(self.strategy).Options.model_fields)
            allowed = ", ".join([*type(self).model_fields, *own])
            raise ValueError(
                f"unknown key 'allocation.{unknown[0]}'; allowed with strategy "
                f"{self.strategy!r}: {allowed} (other strategies' options: "
                f"{', '.join(k for k in owners if k not in own)})"
            )
        fields = strategy_class(self.strategy).Options.model_fields
        try:
            self._options = strategy_options(
                self.strategy, {k: v for k, v in extra.items() if k in fields}
            )
            for key, value in extra.items():  # another strategy's option: still a valid value
                if key not in fields:
                    strategy_options(owners[key][0], {key: value})
        except ConfigError as err:
            raise ValueError(str(err)) from None
        extra.update(self._options.model_dump(mode="json"))  # every default spelled out
        return self

    @property
    def options(self) -> StrategyOptions:
        """The chosen strategy's options (typed, validated, with defaults)."""
        return self._options

    def foreign_options(self) -> list[str]:
        """Keys of this section that are options of other strategies, not of this one."""
        own = strategy_class(self.strategy).Options.model_fields
        return [k for k in self.__pydantic_extra__ or {} if k not in own]

    def foreign_note(self) -> str | None:
        """One line for the run log about the options that do not apply, or None."""
        foreign = self.foreign_options()
        if not foreign:
            return None
        owners = option_owners()
        listed = "; ".join(f"{k} (of {', '.join(owners[k])})" for k in foreign)
        return (
            f"allocation options that do not apply to strategy {self.strategy!r}, ignored: {listed}"
        )

    def without_foreign(self) -> dict[str, Any]:
        """This section as a dict with only the options that apply."""
        foreign = set(self.foreign_options())
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in foreign}


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


def outcome_differences(
    saved: Config, wanted: Config, resolved_elsewhere: tuple[str, ...] = ()
) -> list[str]:
    """``section.key (saved -> wanted)`` for every result-relevant setting that differs;
    ``resolved_elsewhere``: ``train`` keys the caller compares as resolved (the precisions)."""
    a, b = saved.outcome_dict(), wanted.outcome_dict()
    skip = {("train", key) for key in resolved_elsewhere}
    return [
        f"{section}.{key} ({a[section].get(key)!r} -> {b[section].get(key)!r})"
        for section in b
        for key in sorted(set(a[section]) | set(b[section]))
        if a[section].get(key) != b[section].get(key) and (section, key) not in skip
    ]


# Settings that never change a run's results (see Config.outcome_dict).
OPERATIONAL: dict[str, tuple[str, ...]] = {
    "model": ("allow_download",),
    "train": ("device",),  # where, not what: the resolved precision is in the outcome
    "federation": ("round_timeout", "node_wait", "client_cpus", "client_gpus"),
    "run": ("name", "out_dir", "checkpoint_every", "keep_checkpoints", "profile_dir"),
}


class Config(Section):
    """A whole experiment."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataConfig = Field(default_factory=DataConfig)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    allocation: AllocationConfig = Field(default_factory=AllocationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _task_columns(self) -> Config:
        choices = self.data.choice_columns
        if self.model.task == "multiple-choice" and len(choices) < 2:
            raise ValueError(
                f"data.choice_columns = {choices}: model.task = 'multiple-choice' needs one "
                "column per answer choice, at least two"
            )
        if self.model.task == "multiple-choice" and not (
            self.data.context_column or self.data.question_column
        ):
            raise ValueError(
                "data.context_column and data.question_column are both unset: a "
                "multiple-choice task reads each choice with a passage, a question or both; "
                "set at least one"
            )
        if self.model.task != "multiple-choice" and choices:
            raise ValueError(
                f"data.choice_columns = {choices} with model.task = {self.model.task!r}: "
                "choice columns are read only by a multiple-choice task; allowed: "
                "model.task = 'multiple-choice', or no choice_columns"
            )
        if self.model.task == "multiple-choice" and not isinstance(self.data.text_column, str):
            raise ValueError(
                f"data.text_column = {self.data.text_column} with model.task = "
                "'multiple-choice': its inputs are data.context_column, data.question_column "
                "and data.choice_columns; allowed: leave text_column as one column"
            )
        return self

    @model_validator(mode="after")
    def _method_settings(self) -> Config:
        name = self.allocation.strategy
        cls = strategy_class(name)
        if cls.rank_method:
            c = self.clients
            if c.real_budgets or c.upload_mb is not None:
                raise ValueError(
                    f"allocation.strategy = {name!r} with clients.budget_kind = "
                    f"{c.budget_kind!r}{' and clients.upload_mb' if c.upload_mb else ''}: "
                    "a rank method takes layer budgets (each tier's share of the layers becomes "
                    "its rank); allowed: budget_kind = layers without upload_mb"
                )
            if self.allocation.client_model != "full":
                raise ValueError(
                    f"allocation.client_model = {self.allocation.client_model!r} with the rank "
                    f"method {name!r}: its clients train every block; allowed: full"
                )
        if name == "flexlora" and self.lora.freeze_a:
            raise ValueError(
                "lora.freeze_a = true with allocation.strategy = 'flexlora': its server "
                "re-factorises A every round; allowed: false"
            )
        limited = self.clients.real_budgets or self.clients.upload_mb is not None
        if (self.lora.freeze_a or cls.freezes_a) and limited:
            raise ValueError(
                f"FFA-LoRA (allocation.strategy = {name!r}, lora.freeze_a = "
                f"{str(self.lora.freeze_a).lower()}) with limits in real units: cost profiles "
                "are measured with A and B trained; allowed: budget_kind = layers without "
                "upload_mb"
            )
        if self.allocation.client_model == "subnetwork" and self.clients.real_budgets:
            raise ValueError(
                "allocation.client_model = 'subnetwork' with clients.budget_kind = "
                f"{self.clients.budget_kind!r}: cost profiles are measured on the full model; "
                "allowed: budget_kind = layers"
            )
        return self

    def run_name(self) -> str:
        if self.run.name:
            return self.run.name
        return f"{self.allocation.strategy}-{self.data.partition}-seed{self.run.seed}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_toml(self) -> str:
        return tomli_w.dumps(_kebab(self.to_dict()))

    def outcome_dict(self) -> dict[str, Any]:
        """The settings a run's results depend on: what decides whether a run can be reused.

        Operational settings (where the run is written, how often it checkpoints, how long a
        Flower server waits) are left out, so a finished comparison stays reusable when one
        of their defaults changes or a user moves the output folder.
        """
        data = self.to_dict()
        data["allocation"] = self.allocation.without_foreign()
        for section, keys in OPERATIONAL.items():
            for key in keys:
                data[section].pop(key, None)
        return data


def _kebab(d: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("_", "-"): _kebab(v) if isinstance(v, dict) else v for k, v in d.items()}


def _snake(d: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_"): _snake(v) if isinstance(v, dict) else v for k, v in d.items()}


def parse_value(text: str) -> Any:
    """A TOML literal (``5``, ``0.5``, ``true``, ``[1, 2]``, ``"x"``) or else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` to a nested dict (kebab- or snake-case keys)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. federation.rounds=5")
    parts = key.strip().replace("-", "_").split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = None if value.strip().lower() == "none" else parse_value(value.strip())


def format_error(err: ValidationError) -> str:
    """One line for the first problem: key, value received, what is allowed."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        section = _section_of(e["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else ""
        return f"config: unknown key {loc!r}; allowed here: {allowed}"
    msg = e["msg"].removeprefix("Value error, ")
    if "input" in e and not isinstance(e["input"], dict) and loc:
        return f"config: {loc} = {e['input']!r}: {msg}"
    return f"config: {msg}"  # cross-field checks name their fields themselves


def _section_of(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def build_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(_snake(data))
    except ValidationError as err:
        raise ConfigError(format_error(err)) from None


def _read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        return _snake(tomllib.loads(p.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (or the defaults), apply ``--set`` overrides, validate."""
    data: dict[str, Any] = _read_toml(path) if path is not None else {}
    for assignment in overrides or []:
        apply_override(data, assignment)
    return build_config(data)


# Settings added after runs were first written, with the value in effect for a run whose saved
# config lacks them (every run before ``train.precision`` existed trained in fp32 on a CPU).
LEGACY: dict[str, dict[str, Any]] = {"train": {"precision": "fp32", "base_precision": "fp32"}}


def build_saved_config(data: dict[str, Any]) -> Config:
    """The config of a run (or comparison) as it was written: keys it lacks take the value
    they had when it ran (``LEGACY``), not today's default."""
    data = _snake(data)
    for section, values in LEGACY.items():
        given = data.get(section, {})
        data[section] = {**values, **given} if isinstance(given, dict) else given
    return build_config(data)


def load_saved_config(path: str | Path) -> Config:
    """A run directory's config.toml (see ``build_saved_config``)."""
    return build_saved_config(_read_toml(path))
