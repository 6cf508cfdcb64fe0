"""Reading configs: a TOML file plus dotted ``--set`` overrides, validated, with every
problem turned into one line (:class:`ConfigError`) naming the key, the value and what is
allowed; and a run's saved config read as it was written. Pure python + pydantic: no torch.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fedhello.core.config.experiment import Config
from fedhello.core.errors import ConfigError

logger = logging.getLogger(__name__)


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
    if e["type"] in ("model_type", "dict_type") and not isinstance(e.get("input"), dict):
        return (
            f"config: {loc} = {e['input']!r}: {loc} is a section, not a value; allowed: a "
            f"table [{loc}] with its keys (fedhello validate lists them)"
        )
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
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory; allowed: a TOML file")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        return _snake(tomllib.loads(p.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (or the defaults), apply ``--set`` overrides, validate.

    A run's own ``config.toml`` (``is_run_config``) is read as it was written: keys it lacks
    take the value they had when it ran (``LEGACY``), so that ``fedhello run RUN/config.toml``
    reruns the published cell, not today's defaults (a config written before
    ``train.precision`` existed ran in fp32; today's ``auto`` would pick bf16 on a CPU with
    native bf16, and the rerun would differ from round 1 on)."""
    data: dict[str, Any] = _read_toml(path) if path is not None else {}
    if path is not None and is_run_config(path):
        data = with_legacy(data)
        logger.info("%s is a run's config: settings it lacks take their values then", path)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return build_config(data)


# Settings added after runs were first written, with the value in effect for a run whose saved
# config lacks them (every run before ``train.precision`` existed trained in fp32 on a CPU;
# every run before ``model.pooling`` read the encoder through transformers' head as built; every
# run before ``train.head`` and ``train.loss`` averaged the head and trained with cross-entropy).
LEGACY: dict[str, dict[str, Any]] = {
    "train": {
        "precision": "fp32",
        "base_precision": "fp32",
        "head": "federated",
        "loss": "cross-entropy",
    },
    "model": {"pooling": "head"},
}


def is_run_config(path: str | Path) -> bool:
    """Whether ``path`` is the ``config.toml`` of a run folder (beside its ``metrics.jsonl``
    or ``summary.json``), i.e. the settings a finished or started run was made with."""
    p = Path(path)
    return p.name == "config.toml" and any(
        (p.parent / name).is_file() for name in ("metrics.jsonl", "summary.json")
    )


def with_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every ``LEGACY`` setting it lacks at its value of the time."""
    data = _snake(data)
    for section, values in LEGACY.items():
        given = data.get(section, {})
        data[section] = {**values, **given} if isinstance(given, dict) else given
    return data


def build_saved_config(data: dict[str, Any]) -> Config:
    """The config of a run (or comparison) as it was written: keys it lacks take the value
    they had when it ran (``LEGACY``), not today's default."""
    return build_config(with_legacy(data))


def load_saved_config(path: str | Path) -> Config:
    """A run directory's config.toml (see ``build_saved_config``)."""
    return build_saved_config(_read_toml(path))
