"""The registry of client hooks: a strategy declares names (``HookSpec``), this maps them to code.

A new hook is a ``ClientHook`` subclass with a ``name``, decorated with ``@register_hook``;
a strategy whose ``client_hooks`` returns ``HookSpec(name, params)`` then runs it on every
client, on every engine (a Flower node derives the same specs from the run's config).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedhello.core.errors import ConfigError
from fedhello.core.hooks import HookSpec
from fedhello.model.hooks.base import ClientHook, HookChain

_HOOKS: dict[str, type[ClientHook]] = {}


def register_hook(cls: type[ClientHook]) -> type[ClientHook]:
    """Class decorator adding a client hook to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, ClientHook)):
        raise TypeError(f"{cls!r} is not a ClientHook subclass")
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute name = '...' to be registered")
    _HOOKS[cls.name] = cls
    return cls


def hook_names() -> list[str]:
    return sorted(_HOOKS)


def hook_class(name: str) -> type[ClientHook]:
    """The hook registered as ``name``; a ConfigError naming the registered ones otherwise."""
    if name not in _HOOKS:
        raise ConfigError(
            f"client hook {name!r} is not registered (a strategy's client_hooks declares it); "
            f"registered: {', '.join(hook_names())}"
        )
    return _HOOKS[name]


def build_hook(spec: HookSpec) -> ClientHook:
    """A fresh hook for one client's training (hooks may keep state for that client)."""
    cls = hook_class(spec.name)
    try:
        return cls(**spec.params)
    except TypeError as err:
        raise ConfigError(f"client hook {spec}: {err}") from None


def build_hooks(specs: Sequence[HookSpec]) -> HookChain:
    return HookChain([build_hook(s) for s in specs])
