"""The check of a pick at its commit (``SelectionCommit(verify=True)``).

At a layer's commit, each live candidate is applied alone in the layer (and in every layer that
shares its logits), with the weights as they are, to the commit step's batch in eval mode, and
each sample's error is taken: the module's ``sample_errors(outputs, targets)`` where it has one
(``FlexActClassifier``: 1 if misclassified, because the cross-entropy of unchanged weights
favours whichever candidate has the larger outputs), else its loss (``FlexActRegressor``: the
squared error). The pick changes only if another candidate has the lower mean error and is
lower on significantly more samples than it is higher: a sign test, ``z = (n₊ − n₋) / √(n₊ +
n₋)`` of at least ``z_min`` over the batch (every rank's batch under DDP; ties do not count).
Signs, not a t statistic: a twin that is better wherever the two differ wins however small the
difference, and a few outlying samples neither make nor block a switch. The weights were trained
with the pick, so a candidate that still wins is better, not luckier: the check catches twins
the logits cannot tell apart (ReLU and LeakyReLU differ by a 0.01 slope) and an early lock on
the wrong candidate, and leaves near-ties alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from flexact.errors import ConfigError
from flexact.nn import FlexAct
from flexact.nn.trial import applying

__all__ = ["Verdict", "check_group", "check_verifiable", "check_z", "verify_pick"]


@dataclass
class Verdict:
    """A check's outcome: the logits' pick, the chosen candidate and the evidence."""

    pick: str
    chosen: str
    errors: dict[str, float] = field(default_factory=dict)  # mean error per live candidate
    z: dict[str, float] = field(default_factory=dict)  # sign-test z of each one's advantage
    samples: int = 0  # the batch's samples, over all ranks


def check_verifiable(pl_module: L.LightningModule) -> None:
    """Refuse a module whose error the check cannot take per sample.

    Raises:
        ConfigError: Without ``targets_like`` and either ``sample_errors`` or ``criterion`` (a
            ``torch.nn`` loss with ``reduction``), as :class:`~flexact.modules.FlexActModule` has.
    """
    criterion = getattr(pl_module, "criterion", None)
    per_sample = hasattr(pl_module, "sample_errors") or hasattr(criterion, "reduction")
    if not (per_sample and hasattr(pl_module, "targets_like")):
        raise ConfigError(
            f"SelectionCommit(verify=True) takes each candidate's error per sample, through the "
            f"module's sample_errors or criterion (a torch.nn loss with a reduction) and "
            f"targets_like; {type(pl_module).__name__} lacks them: subclass FlexActModule, or "
            f"set verify: false")


def check_z(value: object) -> float:
    """``verify_z`` as a float.

    Raises:
        ConfigError: Unless it is a positive number.
    """
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f"SelectionCommit verify_z must be a positive number (a sign-test z, "
                          f"e.g. 3), got {value!r}")
    return float(value)


def _per_sample(pl_module: Any, batch: Any) -> Tensor:
    """Each sample's error: the module's ``sample_errors`` if it has one, else its loss."""
    x, y = batch
    outputs = pl_module(x)
    y = pl_module.targets_like(outputs, y)
    errors = getattr(pl_module, "sample_errors", None)
    if errors is not None:
        return errors(outputs, y).reshape(outputs.shape[0], -1).mean(1).double()
    criterion = pl_module.criterion
    reduction = criterion.reduction
    criterion.reduction = "none"
    try:
        loss = criterion(outputs, y)
    finally:
        criterion.reduction = reduction
    return loss.reshape(loss.shape[0], -1).mean(1).double()


def verify_pick(pl_module: L.LightningModule, layers: Sequence[FlexAct], batch: Any,
                z_min: float, reduce: Callable[..., Tensor] | None = None) -> Verdict:
    """Check the pick of ``layers`` (one layer, or layers sharing their logits) on ``batch``.

    Args:
        pl_module: The module; its mode is restored afterwards.
        layers: The layers to check, each applying one candidate at a time.
        batch: ``(inputs, targets)`` after the transfer hooks, as ``training_step`` gets it.
        z_min: The sign-test z a switch needs.
        reduce: Sums a tensor over all ranks (``trainer.strategy.reduce``); every rank must
            then call this at the same step. ``None``: this process's batch alone.

    Returns:
        The verdict; ``chosen`` is the pick unless a candidate has the lower mean error and a
        sign-test ``z`` of at least ``z_min``, then the lowest such candidate.
    """
    first = layers[0]
    pick = first.candidate_names[int(first.picks())]
    live = [c for c in first.live_names if all(c in layer.live_names for layer in layers)]
    training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad():
            per_sample = {}
            for candidate in live:
                with applying(layers, candidate):
                    per_sample[candidate] = _per_sample(pl_module, batch)
    finally:
        pl_module.train(training)
    others = [c for c in live if c != pick]
    base = per_sample[pick]
    # One collective: Σ error per candidate, then samples where each one is lower / higher.
    diffs = [base - per_sample[c] for c in others]
    packed = torch.stack([*(per_sample[c].sum() for c in live),
                          *((d > 0).sum().double() for d in diffs),
                          *((d < 0).sum().double() for d in diffs),
                          base.new_tensor(float(base.numel()))])
    if reduce is not None:
        packed = reduce(packed, reduce_op="sum")
    packed = packed.tolist()
    errors = {c: s / packed[-1] for c, s in zip(live, packed[:len(live)], strict=True)}
    z = {}
    for i, candidate in enumerate(others):
        lower, higher = packed[len(live) + i], packed[len(live) + len(others) + i]
        z[candidate] = (lower - higher) / math.sqrt(lower + higher) if lower + higher else 0.0
    better = [c for c in others if z[c] >= z_min and errors[c] < errors[pick]]
    chosen = min(better, key=errors.__getitem__) if better else pick
    return Verdict(pick, chosen, errors, z, int(packed[-1]))


def check_group(pl_module: L.LightningModule, group: Sequence[tuple[str, FlexAct]], batch: Any,
                z_min: float, reduce: Callable[..., Tensor] | None = None) -> Verdict | None:
    """:func:`verify_pick` for ``(name, layer)`` pairs sharing logits, announcing a switch.

    Returns:
        The verdict, or ``None`` where there is nothing to check: one live candidate, or
        per-channel layers.
    """
    layers = [layer for _, layer in group]
    if len(layers[0].live_names) < 2 or any(x.num_channels is not None for x in layers):
        return None
    verdict = verify_pick(pl_module, layers, batch, z_min, reduce)
    if verdict.chosen != verdict.pick:
        rank_zero_info(
            f"SelectionCommit: {group[0][0]} commits to {verdict.chosen}, not the logits' "
            f"{verdict.pick}: error {verdict.errors[verdict.chosen]:.4g} against "
            f"{verdict.errors[verdict.pick]:.4g} (sign test z {verdict.z[verdict.chosen]:.1f})")
    return verdict
