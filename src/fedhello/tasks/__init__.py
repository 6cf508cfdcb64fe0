"""Task kinds behind one registry: ``model.task`` names one, or "auto" lets the model decide.

Built in: ``text`` (one text or a sentence pair), ``image``, ``multiple-choice`` and
``causal-lm`` (instruction tuning of a decoder, the loss on the answers), one module each.
Your own kind is a :class:`Task` subclass registered with :func:`register_task`
(``fedhello.tasks.text.TextTask`` is the usual base: override what changes)::

    from fedhello.tasks import TextTask, register_task

    @register_task
    class Shouted(TextTask):
        name = "shouted"

        def read_inputs(self, tables, cfg):
            return [t.upper() for t in super().read_inputs(tables, cfg)]

The registry sits above the data layer and below the model: the core's config knows no
kinds (``model.task`` is a plain string there), so the name and the task's own cross-field
checks are validated here (:func:`check_config`) where a config is used. Torch-free.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, TypeVar

from fedhello.core.config import Config
from fedhello.core.errors import ConfigError
from fedhello.tasks.base import Task
from fedhello.tasks.causal_lm import CausalLMTask
from fedhello.tasks.image import ImageTask
from fedhello.tasks.multiple_choice import MultipleChoiceTask
from fedhello.tasks.text import TextTask

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO",
    "DEFAULT_TASK",
    "CausalLMTask",
    "ImageTask",
    "MultipleChoiceTask",
    "Task",
    "TextTask",
    "check_config",
    "detect_task",
    "register_task",
    "task_for",
    "task_names",
]

AUTO = "auto"  # model.task: the kind is read from the model's config.json
DEFAULT_TASK = "text"  # what "auto" means for a model no registered kind claims

T = TypeVar("T", bound=type[Task])

# Name -> the one instance of its kind, in registration order ("auto" asks them in this order).
_TASKS: dict[str, Task] = {}


def register_task(cls: T) -> T:
    """Class decorator adding a task kind under ``cls.name`` (a later one replaces an
    earlier one of the same name); returns the class unchanged."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"{cls!r} is not a Task subclass; register_task takes the class")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name or name == AUTO:
        raise TypeError(
            f"{cls.__name__} needs a class attribute name = '...' (not {AUTO!r}) to be registered"
        )
    if name in _TASKS:
        logger.info("task %r: %s replaces %s", name, cls.__name__, type(_TASKS[name]).__name__)
    _TASKS[name] = cls()
    return cls


def task_names() -> list[str]:
    """The registered kinds, sorted (``model.task`` also takes "auto")."""
    return sorted(_TASKS)


def task_for(name: str) -> Task:
    """The task registered as ``name``; a ConfigError naming the allowed values otherwise."""
    if name in _TASKS:
        return _TASKS[name]
    allowed = ", ".join(task_names())
    if name == AUTO:
        raise ConfigError(
            f"model.task = {AUTO!r} is resolved from the model's config, not looked up; "
            f"allowed here: {allowed}"
        )
    raise ConfigError(f"model.task = {name!r}: unknown task; allowed: {AUTO}, {allowed}")


def detect_task(model_config: Mapping[str, Any]) -> str:
    """What ``model.task = "auto"`` means for a model with this ``config.json``: the first
    registered kind that claims it (``Task.detects``), else ``DEFAULT_TASK``."""
    return next((n for n, t in _TASKS.items() if t.detects(model_config)), DEFAULT_TASK)


def check_config(cfg: Config, task: Task | None = None) -> Config:
    """``cfg`` if its task accepts it: ``model.task`` names a registered kind (or "auto") and
    the kind's own cross-field checks pass (``Task.check_config``); a ConfigError otherwise.

    ``task``: the kind "auto" resolved to, once the model is known; before that, "auto" is
    checked as ``DEFAULT_TASK`` (every built-in kind "auto" can pick refuses the same things).
    """
    name = cfg.model.task
    kind = task or task_for(DEFAULT_TASK if name == AUTO else name)
    if task is not None or name != AUTO:  # "auto" may yet resolve to a causal LM
        _check_conversation_columns(cfg, kind)
    kind.check_config(cfg)
    return cfg


CONVERSATION_KEYS = ("prompt_column", "response_column", "messages_column")


def _check_conversation_columns(cfg: Config, kind: Task) -> None:
    """The prompt, response and messages columns are a causal LM's: set for another kind,
    they are an error rather than a setting silently ignored."""
    if isinstance(kind, CausalLMTask):
        return
    for key in CONVERSATION_KEYS:
        value = getattr(cfg.data, key)
        if value is not None:
            raise ConfigError(
                f"config: data.{key} = {value!r} with model.task = {kind.name!r}: prompt, "
                "response and messages columns are read only by a causal-lm task; allowed: "
                "model.task = 'causal-lm', or leave it unset"
            )


for _kind in (TextTask, ImageTask, MultipleChoiceTask, CausalLMTask):
    register_task(_kind)
