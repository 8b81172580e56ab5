"""Exceptions raised by flexact for bad user input."""

from __future__ import annotations

__all__ = ["ConfigError", "check_positive_ints"]


class ConfigError(ValueError):
    """A user-supplied argument or config value is invalid.

    A subclass of :class:`ValueError`, so callers that catch ``ValueError`` keep working; the CLI
    prints these as one-line errors instead of tracebacks because the message says how to fix them.
    """


def check_positive_ints(**values: int | None) -> None:
    """Raise :class:`ConfigError` naming the first value that is not a positive int.

    ``None`` values are skipped (optional sizes).
    """
    for label, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ConfigError(f"{label} must be a positive int, got {value!r}")
