"""How a tournament trial picks its winner among the k candidates of its FlexAct layers.

``probability``: the candidate of highest mean selection probability. The logits follow the
training loss, so this serves in-distribution fitness. ``oneshot``: the network committed to
each candidate in turn, with the weights the FlexAct phase trained and no further training,
is scored on the validation split (the trial's fitness; the OOD region when the data module
has one), as one-shot weight-sharing NAS does; k evaluation passes, no optimizer steps.
``finetune``: the ``top`` candidates by one-shot score are each fine-tuned from the shared
weights and scored on the validation split; the best fine-tuned network is the trial's result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from flexact.nn.layer import flexact_layers
from flexact.probe.sites import with_activation

__all__ = ["TOURNAMENT_SCORES", "mean_probabilities", "oneshot_scores", "ranked"]

TOURNAMENT_SCORES = ("probability", "oneshot", "finetune")


def mean_probabilities(model: nn.Module, candidates: Sequence[str]) -> dict[str, float]:
    """Each candidate's selection probability, averaged over every FlexAct layer (and channel).

    Raises:
        ValueError: If the model has no FlexAct layers.
    """
    layers = [layer for _, layer in flexact_layers(model)]
    if not layers:
        raise ValueError("the model has no FlexAct layers to read probabilities from")
    mean = torch.stack([layer.probabilities().reshape(-1, len(candidates)).mean(0)
                        for layer in layers]).mean(0)
    return dict(zip(candidates, (float(p) for p in mean), strict=True))


def oneshot_scores(model: nn.Module, sites: Sequence[str], candidates: Sequence[str],
                   evaluate: Callable[[], float]) -> dict[str, float]:
    """``evaluate()`` with every site committed to each candidate in turn, weights shared.

    The sites' modules (the FlexAct layers) are put back afterwards, even if ``evaluate``
    raises, so the model leaves as it came.

    Args:
        model: The network whose ``sites`` hold the tournament's FlexAct layers.
        sites: Qualified names of the activation sites (:func:`activation_sites`).
        candidates: Expressions to commit to, one at a time.
        evaluate: Scores the model as it stands (e.g. the validation metric).

    Returns:
        Candidate → score; a non-finite score stays as it is (:func:`ranked` puts it last).
    """
    saved = {path: model.get_submodule(path) for path in sites}
    scores: dict[str, float] = {}
    try:
        for candidate in candidates:
            with_activation(model, candidate, list(sites), inplace=True)
            scores[candidate] = float(evaluate())
    finally:
        for path, module in saved.items():
            parent_name, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, name, module)
    return scores


def ranked(scores: dict[str, float], maximize: bool = False) -> list[str]:
    """Candidates best first; non-finite scores last, ties in the given order."""
    def key(item: tuple[int, str]) -> tuple[bool, float, int]:
        value = scores[item[1]]
        finite = math.isfinite(value)
        return (not finite, (-value if maximize else value) if finite else 0.0, item[0])

    return [name for _, name in sorted(enumerate(scores), key=key)]
