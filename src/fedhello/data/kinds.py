"""What the data layer asks of a task kind, and what it hands to training: two protocols.

The data layer is generic: it finds a dataset, reads its labels, drops hidden splits, fixes
the train/validation/test split and caps the training pool, for any kind of task. What
differs between kinds (which columns hold the inputs, how a row becomes an input, how labels
become class ids, how inputs become tensors) it asks of an :class:`InputKind`, which the task
modules of ``fedhello.tasks`` implement one layer up. The data layer never names a kind.

Torch-free (torch is named for type checking only), so that ``fedhello.data.loading`` and the
config checks stay light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedhello.core.config import DataConfig

if TYPE_CHECKING:
    import torch


class ModelInputs(Protocol):
    """What training, evaluation and Fisher scoring read: labels and batches by position."""

    labels: torch.Tensor
    trim: bool

    def __len__(self) -> int: ...

    def length_order(self, idx: np.ndarray) -> np.ndarray: ...

    def batch(
        self, idx: Sequence[int] | np.ndarray, augment: tuple[int, ...] | None = None
    ) -> dict[str, torch.Tensor]: ...


class InputKind(Protocol):
    """The data side of a task kind (``fedhello.tasks.Task`` implements it).

    ``name`` is the kind's ``model.task`` value; the methods read a split's table (a pandas
    DataFrame or a ``datasets.Dataset``) with the settings of ``cfg``, and raise a
    ``DataError`` naming the config key, the column and what is allowed when it cannot.
    """

    name: str

    def check_inputs(self, table: Any, cfg: DataConfig) -> None:
        """One clear error for the first input column ``table`` lacks (before reading)."""
        ...

    def read_inputs(self, tables: Mapping[str, Any], cfg: DataConfig) -> Sequence[Any]:
        """The inputs of every table, concatenated in the tables' order (as the labels are)."""
        ...

    def label_ids(
        self, labels: list[Any], tables: Mapping[str, Any], cfg: DataConfig
    ) -> tuple[list[str], np.ndarray]:
        """(class names, one class id per label) of the raw labels of every table."""
        ...

    def encode(
        self,
        inputs: Sequence[Any],
        labels: torch.Tensor,
        processor: Any,
        max_length: int,
        augment: bool,
    ) -> ModelInputs:
        """Model inputs of ``inputs`` (as ``read_inputs`` made them), with their ``labels``."""
        ...
