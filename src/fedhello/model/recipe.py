"""What ``train.head`` and ``train.loss`` ``auto`` stand for in a run: the label skew recipe
(``fedhello.core.heads.auto_head``, ``auto_loss``) where the task has class rows (for the head
also: the model's head is one linear layer and DP is off, else the averaged head), and the
averaged head and cross-entropy for a task without class rows. The core's config knows no task kinds
and no model, so ``auto`` is resolved here, once the task is known (and the model built)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from fedhello.core.config import Config
from fedhello.core.heads import AUTO, auto_head, auto_loss
from fedhello.model.class_means import has_linear_head
from fedhello.tasks.base import Task

logger = logging.getLogger(__name__)


def resolve_recipe(cfg: Config, task: Task, model: torch.nn.Module) -> Config:
    """``cfg`` with ``train.head`` and ``train.loss`` ``auto`` replaced by what they stand for
    with this task and model (``fedhello.core.heads.auto_head``, ``auto_loss``): the run
    trains, records and sends its nodes the resolved settings, and its config.toml keeps
    ``auto``."""
    rows = cfg.train.head == AUTO and task.class_rows and has_linear_head(model)
    resolved, update = _with_auto(cfg, rows, task.class_rows)
    if "head" in update:
        every = ", trained every round" if update["head_finetune_rounds"] == "all" else ""
        logger.info("train.head = auto: %s%s", update["head"], every)
    if "loss" in update:
        logger.info("train.loss = auto: %s", update["loss"])
    return resolved


def settled_by_task(cfg: Config, task: Task) -> Config:
    """``cfg`` with ``train.head`` and ``train.loss`` ``auto`` replaced where its task alone
    settles them: a task without class rows (multiple choice, a language model) gets the
    averaged head and cross-entropy whatever the model. A comparison compares configs so
    (``fedhello.studies.compare``), and reuses a cell written before ``auto`` existed where
    ``auto`` changes nothing."""
    return cfg if task.class_rows else _with_auto(cfg, False, False)[0]


def _with_auto(cfg: Config, head_rows: bool, loss_rows: bool) -> tuple[Config, dict[str, Any]]:
    """``cfg`` with its ``auto`` head and loss resolved for a head with class rows or not (and
    a task whose labels are classes or not), and what changed."""
    t = cfg.train
    update: dict[str, Any] = {}
    if t.head == AUTO:
        update["head"], update["head_finetune_rounds"] = auto_head(head_rows, cfg.privacy.enabled)
    if t.loss == AUTO:
        update["loss"] = auto_loss(loss_rows)
    if not update:
        return cfg, update
    return cfg.model_copy(update={"train": t.model_copy(update=update)}), update
