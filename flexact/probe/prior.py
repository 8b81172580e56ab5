"""``prior: probe.json``: a FlexAct layer's initial selection from a probe's ranking.

``flexact probe`` writes each candidate's ``weight`` = exp(z), z its predicted metric
standardized over the probed candidates (higher is better, clipped to ±3). A layer whose
``prior`` is the path of that file starts with probabilities proportional to its candidates'
weights, so the logits start at the probe's z-scores (relative to each other).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from flexact.errors import ConfigError
from flexact.nn.expressions import is_expression

__all__ = ["candidate_key", "prior_from_probe"]


def candidate_key(name: str) -> str:
    """The name under which a candidate is matched: its canonical form.

    An expression's is :func:`~flexact.nn.canonical.canonical`; a registry name that computes
    a one-operator function has that expression's (``relu`` → ``relu(x)``); other registry
    names are their own key.
    """
    from flexact.nn.canonical import canonical, canonical_of_module

    if is_expression(name):
        return canonical(name)
    from flexact.nn.registry import get_activation

    return canonical_of_module(get_activation(name)) or name


def prior_from_probe(path: str | Path, candidates: Sequence[str]) -> tuple[float, ...]:
    """Prior probabilities of ``candidates`` from a probe.json file (normalized).

    Raises:
        ConfigError: If the file is missing or malformed, or lacks a candidate.
    """
    path = Path(path)
    try:
        ranking = json.loads(path.read_text())["candidates"]
        weights = {}
        for row in ranking:
            weights[row["candidate"]] = weights[row["canonical"]] = float(row["weight"])
    except FileNotFoundError:
        raise ConfigError(f"prior file {str(path)!r} does not exist; write it with "
                          "`flexact probe --config ... --out DIR` (DIR/probe.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"prior file {str(path)!r} is not a probe.json written by flexact "
                          f"probe ({type(err).__name__}: {err})") from None
    missing = [c for c in candidates if c not in weights and candidate_key(c) not in weights]
    if missing:
        raise ConfigError(f"prior file {str(path)!r} has no ranking for candidates {missing}; "
                          "probe them too (flexact probe --candidates ...)")
    values = [weights.get(c, weights.get(candidate_key(c), 0.0)) for c in candidates]
    total = sum(values)
    return tuple(v / total for v in values)
