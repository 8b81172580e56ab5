"""Argument checks for the callbacks' ``__init__``: each raises ConfigError naming the argument."""

from __future__ import annotations

from collections.abc import Sequence

from flexact.errors import ConfigError

__all__ = ["check_choice", "check_flag", "check_fraction", "check_name", "check_positive_int"]


def check_positive_int(owner: str, name: str, value: object) -> int:
    """``value`` as a plain ``int`` (checkpoints refuse jsonargparse's number types).

    Raises:
        ConfigError: If ``value`` is not an int ≥ 1 (a bool is not an int here).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner} {name} must be a positive int, got {value!r}")
    return int(value)


def check_flag(owner: str, name: str, value: object) -> bool:
    """``value`` if it is a bool.

    Raises:
        ConfigError: If ``value`` is not ``True`` or ``False``.
    """
    if not isinstance(value, bool):
        raise ConfigError(f"{owner} {name} must be true or false, got {value!r}")
    return value


def check_name(owner: str, name: str, value: object) -> str:
    """``value`` if it is a non-empty file name.

    Raises:
        ConfigError: If ``value`` is not a string or is blank.
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{owner} {name} must be a non-empty file name, got {value!r}")
    return value


def check_fraction(owner: str, name: str, value: object) -> float:
    """``value`` as a float in [0, 1].

    Raises:
        ConfigError: If ``value`` is not a number in [0, 1] (a bool is not a number here).
    """
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{owner} {name} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def check_choice(owner: str, name: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``.

    Raises:
        ConfigError: Naming the choices otherwise.
    """
    if value not in choices:
        *first, last = map(repr, choices)
        raise ConfigError(f"{owner} {name} must be {', '.join(first)} or {last}, got {value!r}")
    return value
