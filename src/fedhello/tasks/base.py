"""The task protocol: everything that differs between kinds of task, in one small class.

A federation is the same loop whatever it learns: clients train LoRA blocks and a head on
batches, the server averages them, the global model is scored. What a *kind* of task changes
is at the edges: which dataset columns hold the inputs and how a row becomes one, how labels
become class ids, how inputs become tensors, which transformers head and processor the model
gets, what a full-size synthetic batch looks like for the cost probe, and whether
``model.max_length`` means anything. A :class:`Task` owns exactly those decisions, so the data
layer, the model loader, the probe and the export ask it instead of branching on a name, and a
new kind is one module (a subclass) and one registration (``fedhello.tasks.register_task``).

Torch-free at import: ``fedhello plan`` and the config checks use the registry without torch;
the methods that build tensors or models import torch and transformers when called.

What stays shared, because it does not differ between the kinds fedhello has: the head modules
(``fedhello.model.lora.HEAD_NAMES``: ``classifier`` or ``score``, whatever the auto class
builds). The metrics are the task's (``predictions``, ``scores``): every built-in kind predicts
one class per example (for multiple choice, the chosen answer) and scores accuracy and
macro-F1; a generative kind would score its outputs otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhello.core.config import Config, DataConfig
from fedhello.core.errors import ConfigError
from fedhello.data.columns import check_columns
from fedhello.data.loading import encode_labels

if TYPE_CHECKING:
    import torch

    from fedhello.data.kinds import ModelInputs


class Task(ABC):
    """One kind of task: a classifier of texts, of images, of answer choices, ...

    Subclass it (or a built-in kind, overriding only what changes), set ``name`` and ``head``,
    and register the class with ``fedhello.tasks.register_task``; ``model.task = "<name>"``
    then selects it. Instances hold no state: one instance serves every run of the process.
    Errors a user can fix are ``ConfigError`` (settings) or ``DataError`` (the data), one line
    naming the key, the value and what is allowed.
    """

    name: str = ""  # the value of ``model.task`` that selects this kind
    head: str = ""  # the transformers head: the model is ``AutoModelFor<head>``
    uses_max_length: bool = True  # inputs are token sequences cut at ``model.max_length``
    # scored by its outputs' text (loss, perplexity, generation: fedhello.engine.generative),
    # not by predicted classes; such a kind has no trained head
    generative: bool = False
    # its head has one row per class, and its labels are classes a client may lack: what
    # train.head = "auto" (class means) and train.loss = "auto" (logit adjustment) need
    class_rows: bool = True

    # -- the config ---------------------------------------------------------------------------

    def check_config(self, cfg: Config) -> None:
        """The checks of ``cfg`` that depend on the task (the core's config knows no kinds).

        Run where a config is validated for use (``fedhello validate``, ``run``, the API's
        functions) and again once ``model.task = "auto"`` is resolved. By default a task reads
        no answer-choice columns, so setting ``data.choice_columns`` is an error rather than a
        setting silently ignored.
        """
        choices = cfg.data.choice_columns
        if choices:
            raise ConfigError(
                f"config: data.choice_columns = {choices} with model.task = "
                f"{cfg.model.task!r}: choice columns are read only by a multiple-choice task; "
                "allowed: model.task = 'multiple-choice', or no choice_columns"
            )

    # -- the data -----------------------------------------------------------------------------

    @abstractmethod
    def input_columns(self, cfg: DataConfig) -> list[tuple[str, str]]:
        """(column, config key) of every input column this kind reads, in reading order."""

    def check_inputs(self, table: Any, cfg: DataConfig) -> None:
        """One clear error for the first input column ``table`` lacks, before anything is
        read (a hidden split is checked too: a wrong column is wrong everywhere)."""
        check_columns(table, self.input_columns(cfg), cfg.name)

    @abstractmethod
    def read_inputs(self, tables: Mapping[str, Any], cfg: DataConfig) -> Sequence[Any]:
        """The inputs of every table, concatenated in the tables' order (as the labels are):
        whatever ``encode`` takes (texts, tuples, a lazy image column)."""

    def label_ids(
        self, labels: list[Any], tables: Mapping[str, Any], cfg: DataConfig
    ) -> tuple[list[str], np.ndarray]:
        """(class names, class id of each label): by default the labels are class names or
        ids (``fedhello.data.loading.encode_labels``)."""
        return encode_labels(labels, tables)

    @abstractmethod
    def encode(
        self,
        inputs: Sequence[Any],
        labels: torch.Tensor,
        processor: Any,
        max_length: int,
        augment: bool,
    ) -> ModelInputs:
        """Model inputs of ``inputs`` with their ``labels``, made with the model's
        ``processor`` (``load_processor``); ``augment``: training batches may be augmented."""

    # -- the model ----------------------------------------------------------------------------

    def detects(self, model_config: Mapping[str, Any]) -> bool:
        """Whether ``model.task = "auto"`` means this kind for a model with this
        ``config.json`` (a dict). None claims a model by default; ``text`` is the fallback."""
        return False

    @property
    def export_class(self) -> str:
        """The transformers class that loads this kind's model: what ``load_model`` builds
        and what ``fedhello export`` tells the user to load the merged model with."""
        return f"AutoModelFor{self.head}"

    def model_class(self) -> Any:
        """The transformers auto class of ``export_class``."""
        import transformers

        return getattr(transformers, self.export_class)

    def load_processor(self, source: str, offline: bool) -> Any:
        """The model's input processor; by default its tokenizer."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, local_files_only=offline)

    @abstractmethod
    def synthetic_batch(
        self, model: Any, batch_size: int, max_length: int, num_labels: int
    ) -> dict[str, torch.Tensor]:
        """A full-size training batch of random inputs and labels for the cost probe, the same
        on every call (its own generator, seeded 0): the profile must not depend on a dataset
        nor change the run's random draws."""

    # -- the scores ---------------------------------------------------------------------------

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Each example's predicted class from the head's output (a score per class, or per
        answer choice): the highest."""
        return logits.argmax(dim=-1)

    def scores(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """The kind's metrics of ``predictions`` against ``labels``, in the order the run's
        records show them (the evaluation adds the loss and the count): by default
        ``classification_scores``."""
        return classification_scores(predictions, labels)


def classification_scores(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, and macro-F1 averaged over the classes present in the labels or the
    predictions (a class neither holds would add a meaningless 0); then how many classes
    were predicted and how evenly (``prediction_spread``)."""
    from sklearn.metrics import f1_score  # not for training: imported when scoring

    return {
        "accuracy": float((predictions == labels).mean()),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        **prediction_spread(predictions),
    }


# A collapse: one class takes at least this share of the predictions ...
COLLAPSE_SHARE = 0.8
# ... while the most frequent true label holds less than this share of the labels.
COLLAPSE_MAJORITY = 0.5


def prediction_spread(predictions: np.ndarray) -> dict[str, float]:
    """``predicted_classes``: how many distinct classes ``predictions`` holds (for multiple
    choice: answer positions); ``prediction_entropy``: the Shannon entropy, in nats, of the
    distribution of the predicted classes, rounded to 4 decimals: 0 when every example gets
    the same class, log(K) when the predictions spread evenly over K classes. A model that
    collapsed to one class under label skew shows 1 and 0 whatever its accuracy."""
    _, counts = np.unique(np.asarray(predictions), return_counts=True)
    p = counts / max(1, counts.sum())
    entropy = float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: never -0.0
    return {"predicted_classes": len(counts), "prediction_entropy": round(entropy, 4)}


def per_class_recall(
    predictions: np.ndarray, labels: np.ndarray, names: Sequence[str]
) -> dict[str, float]:
    """Class name -> the share of its examples predicted as it (recall), rounded to 4
    decimals, for the class ids ``0..len(names) - 1``. A class absent from ``labels`` has no
    recall and is omitted (not 0, not null): the dict names only the classes tested."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    recall = {}
    for i, name in enumerate(names):
        mask = labels == i
        if mask.any():
            recall[str(name)] = round(float((predictions[mask] == i).mean()), 4)
    return recall


def collapsed_class(predictions: np.ndarray, labels: np.ndarray) -> tuple[int, float, float] | None:
    """(class, its share of the predictions, the most frequent true label's share) when the
    model answers (nearly) one class where the data is not that skewed: one class gets at
    least ``COLLAPSE_SHARE`` (80%) of the predictions while the most frequent true label holds
    less than ``COLLAPSE_MAJORITY`` (50%) of the labels; else None (also for no examples).
    On data where one label is the majority, predicting it mostly is no evidence of collapse."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if len(predictions) == 0 or len(labels) == 0:
        return None
    classes, counts = np.unique(predictions, return_counts=True)
    share = float(counts.max() / counts.sum())
    majority = float(np.unique(labels, return_counts=True)[1].max() / len(labels))
    if share >= COLLAPSE_SHARE and majority < COLLAPSE_MAJORITY:
        return int(classes[counts.argmax()]), share, majority
    return None
