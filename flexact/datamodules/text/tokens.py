"""Tokenization: the matches of a regular expression are the tokens."""

from __future__ import annotations

import re

from flexact.errors import ConfigError

__all__ = ["DEFAULT_TOKEN_PATTERN", "compile_token_pattern", "tokenize"]

DEFAULT_TOKEN_PATTERN = r"\w+(?:'\w+)?|[^\w\s]"
"""Words (with an optional apostrophe suffix, "don't") or single punctuation marks."""


def compile_token_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a token pattern given by the user.

    Args:
        pattern: Regular expression whose matches are the tokens.

    Returns:
        The compiled expression.

    Raises:
        ConfigError: If ``pattern`` is not a valid regular expression.
    """
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"token_pattern {pattern!r} is not a valid regular expression: "
                          f"{err}") from None


def tokenize(text: str, pattern: str | re.Pattern[str] = DEFAULT_TOKEN_PATTERN,
             lowercase: bool = True) -> list[str]:
    """Split a text into tokens with a regular expression.

    Args:
        text: The text.
        pattern: Regular expression whose matches are the tokens.
        lowercase: Lower-case the text first.

    Returns:
        The tokens, in order.
    """
    if lowercase:
        text = text.lower()
    return re.findall(pattern, text)
