"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (config, paths, budgets, data, run directories): the message is the whole story.

    Messages name the problem, the value received and what is allowed, in one line, so the CLI
    never needs a traceback to explain them.
    """


class ConfigError(UserError):
    """A config key or value is wrong."""


class DataError(UserError):
    """A dataset is missing, unreadable or lacks the expected columns."""


class ModelError(UserError):
    """A model name or path cannot be loaded."""


class RunDirError(UserError):
    """A run directory is in a state that would lose or mix results."""
