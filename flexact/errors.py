"""Exceptions raised by flexact for bad user input."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A user-supplied argument or config value is invalid.

    A subclass of :class:`ValueError`, so callers that catch ``ValueError`` keep working; the CLI
    prints these as one-line errors instead of tracebacks because the message says how to fix them.
    """
