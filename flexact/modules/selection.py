"""How the selection logits learn: defaults for a FlexAct head and for FlexAct everywhere.

The two settings answer different questions and were chosen apart against a sweep of
fixed-activation runs (benchmarks/RESULTS.md, "One FlexAct run vs a sweep"; docs/method.md §5;
for FlexAct everywhere the measured gain is decisiveness, 92 % of layers against 33 %, with
picks as often within the sweep's noise as before):

- **Head only** (``swap_backbone`` off): each FlexAct layer on its own, the logits learning from the
  first step at a rate that grows geometrically over the run, from 5 × the optimizer's to 3000 × at
  the end: slow early, where a fast rate locks onto the first candidate that helps, fast late, where
  a slow one leaves near-ties (ReLU and LeakyReLU, or a text CNN's head, where every candidate is
  within the sweep's noise) undecided at the latest commit. Where an affine map follows the head's
  FlexAct layer (``hidden_features``), ``selection_gradient: auto`` compares the candidates on equal
  footing (``standardized``): that map absorbs a candidate's scale and offset, so only its shape
  should decide (a digits LeNet's head picks Sigmoid, within the sweep's noise of its best, in 6/6
  seeds instead of a ReLU-like candidate outside it).
- **Everywhere** (``swap_backbone`` on): one selection for the whole network (the question a
  sweep answers), the logits held fixed for the first 30 % of training while the weights fit
  under the uniform mixture, then learning at 100 × the optimizer's rate, growing to 3000 × at
  the run's end. Early in training the loss falls fastest through the most linear candidate,
  so layers that select from the first step drift to Identity and commit there; after the
  warm-up the logits follow the signal that separates the candidates once the weights fit, and
  the growing rate decides the ties that remain (a depth-8 teacher's ReLU and LeakyReLU).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import lightning as L
import torch
from torch import nn

from flexact.callbacks.progress import run_length
from flexact.errors import ConfigError
from flexact.nn import FlexAct, FlexActHead, flexact_layers
from flexact.nn.params import selection_groups
from flexact.nn.surgery import share_selection as tie_selections

__all__ = ["EVERYWHERE", "HEAD_ONLY", "REGULARIZED_LR_SCALE_END", "STANDARDIZED_HEAD_LR_SCALE",
           "SelectionSchedule", "SelectionSettings", "check_shared_checkpoint",
           "freeze_selection_logits", "ramped_selection_lr", "resolve_selection",
           "selection_logits"]


@dataclass(frozen=True)
class SelectionSettings:
    """How the selection logits learn.

    Args:
        lr_scale: Their learning rate over the optimizer's when they start learning.
        share: One set of logits for every FlexAct layer.
        warmup: Fraction of training during which they stay fixed.
        lr_scale_end: Their learning rate over the optimizer's at the end of the run; between
            the warm-up's end and the run's end the scale grows (or shrinks) geometrically.
            Equal to ``lr_scale``: a constant rate.
    """

    lr_scale: float
    share: bool
    warmup: float
    lr_scale_end: float

    def as_hparams(self) -> dict[str, float | bool]:
        """The module's hyper-parameters of these settings."""
        return {"selection_lr_scale": self.lr_scale, "share_selection": self.share,
                "selection_warmup": self.warmup, "selection_lr_scale_end": self.lr_scale_end}

    def lr_factor(self, step: int, total: int) -> float:
        """The logits' rate at optimizer step ``step`` of ``total`` over their rate at the start.

        1 for a constant rate; grows geometrically from the warm-up's end to the run's end.
        """
        if self.lr_scale_end == self.lr_scale:
            return 1.0
        progress = (step / total - self.warmup) / (1.0 - self.warmup)
        return (self.lr_scale_end / self.lr_scale) ** min(max(progress, 0.0), 1.0)

    def run_steps(self, trainer: L.Trainer) -> int | None:
        """The run's optimizer steps where the warm-up or a changing rate needs them, else None.

        Raises:
            ConfigError: If they are needed and the run has no known, finite length.
        """
        if self.warmup > 0:
            return run_length(trainer, "step", None, "selection_warmup",
                              "set trainer.max_steps, or selection_warmup: 0")
        if self.lr_scale_end != self.lr_scale:
            return run_length(trainer, "step", None, "selection_lr_scale_end",
                              "set trainer.max_steps, or selection_lr_scale_end equal to "
                              "selection_lr_scale for a constant rate")
        return None


HEAD_ONLY = SelectionSettings(lr_scale=5.0, share=False, warmup=0.0, lr_scale_end=3000.0)
STANDARDIZED_HEAD_LR_SCALE = 1.0
"""A head-only head with the standardized selection gradient starts at the optimizer's own rate
(×5 picked Tanh for a ReLU teacher's head; benchmarks/RESULTS.md, "Reading the sweep table")."""
EVERYWHERE = SelectionSettings(lr_scale=100.0, share=True, warmup=0.3, lr_scale_end=3000.0)
REGULARIZED_LR_SCALE_END: Mapping[bool, float] = MappingProxyType(
    {False: 300.0, True: EVERYWHERE.lr_scale})
"""The default ``selection_lr_scale_end`` with α > 0, head only (False) or everywhere (True,
a constant rate): the ends before 3000×. A resumed run keeps the end it was saved with, also
when it changes α. Once the task's gradient on a decided selection fades, Adam turns the
KL term's steady pull into steps of the full rate, and at 3000× it flipped a synthetic ReLU head
to Tanh or Sigmoid in 2 of 6 runs with SelectionCommit (0 of 6 at 300×; docs/method.md §5)."""


def _shareable(layers: list[FlexAct]) -> bool:
    return all(layer.num_channels is None and layer.candidate_names == layers[0].candidate_names
               for layer in layers)


def resolve_selection(model: nn.Module, swap_backbone: bool, lr_scale: float | None,
                      share: bool | None, warmup: float | None,
                      lr_scale_end: float | None = None, alpha: float = 0.0) -> SelectionSettings:
    """The settings a module uses (the given values, the others its mode's defaults), applied.

    Ties the layers' logits together (:func:`flexact.nn.surgery.share_selection`) if shared.

    With FlexAct everywhere, the default shares one selection only where every layer has the
    same candidates and selects per layer (``share_selection: true`` asked for explicitly
    raises in that case instead). A head-only :class:`~flexact.FlexActHead` with an output map
    resolves ``selection_gradient: auto`` to ``standardized``; a head-only head whose gradient
    is standardized starts at :data:`STANDARDIZED_HEAD_LR_SCALE` by default.

    Args:
        model: The network (its FlexAct layers decide whether sharing is possible).
        swap_backbone: FlexAct everywhere (:data:`EVERYWHERE`), else :data:`HEAD_ONLY`.
        lr_scale: ``selection_lr_scale``, ``None`` for the default.
        share: ``share_selection``, ``None`` for the default.
        warmup: ``selection_warmup``, ``None`` for the default.
        lr_scale_end: ``selection_lr_scale_end``; ``None``: a constant rate where
            ``lr_scale`` is given, else the mode's default (with ``alpha`` > 0,
            :data:`REGULARIZED_LR_SCALE_END`).
        alpha: The module's α (the KL term's weight).

    Raises:
        ConfigError: If ``warmup`` is outside [0, 1), or ``share`` is asked for layers that
            cannot share.
    """
    defaults = EVERYWHERE if swap_backbone else HEAD_ONLY
    if share is None:
        layers = [layer for _, layer in flexact_layers(model)]
        share = defaults.share and bool(layers) and _shareable(layers)
    warmup = defaults.warmup if warmup is None else float(warmup)
    if not 0.0 <= warmup < 1.0:
        raise ConfigError(f"selection_warmup must be in [0, 1) (a fraction of training), got "
                          f"{warmup!r}")
    if share:
        tie_selections(model)
    head = getattr(model, "head", None)
    layer = getattr(head, "flexact", None)
    if (not swap_backbone and isinstance(head, FlexActHead) and head.output is not None
            and isinstance(layer, FlexAct) and layer.spec.selection_gradient == "auto"):
        layer.selection_gradient = "standardized"  # an affine map follows: compare shapes
    if lr_scale_end is None and lr_scale is not None:  # a rate asked for stays constant
        lr_scale_end = lr_scale
    elif lr_scale_end is None:
        lr_scale_end = (REGULARIZED_LR_SCALE_END[swap_backbone] if alpha > 0
                        else defaults.lr_scale_end)
    if lr_scale is None:
        standardized = (not swap_backbone and isinstance(layer, FlexAct)
                        and layer.selection_gradient == "standardized")
        lr_scale = STANDARDIZED_HEAD_LR_SCALE if standardized else defaults.lr_scale
    return SelectionSettings(float(lr_scale), bool(share), warmup, float(lr_scale_end))


def selection_logits(model: nn.Module) -> Iterable[nn.Parameter]:
    """Every FlexAct layer's selection logits, each Parameter once (shared logits too)."""
    return {id(layer.logits): layer.logits for _, layer in flexact_layers(model)}.values()


def freeze_selection_logits(model: nn.Module, step: int, total: int, warmup: float) -> bool:
    """Drop the logits' gradients while ``step`` is in the first ``warmup`` of ``total`` steps.

    With no gradient the optimizer skips them altogether (Adam's moments stay empty), so the
    logits start learning after the warm-up as from scratch. ``step`` is the trainer's global
    step and ``total`` the run's length (:meth:`SelectionSettings.run_steps`): every rank and a
    resumed run agree on them.

    Returns:
        Whether the logits were frozen at this step.
    """
    if warmup <= 0 or step >= warmup * total:
        return False
    for logits in selection_logits(model):
        logits.grad = None
    return True


@contextmanager
def ramped_selection_lr(optimizer: Any, factor: float) -> Iterator[None]:
    """Run one optimizer step with the selection logits' rate times ``factor``.

    The logits' groups (:data:`flexact.nn.params.LR_SCALE_KEY`) get their rate times
    ``factor`` (:meth:`SelectionSettings.lr_factor`) for the step and their own rate back right
    after it, so schedulers only ever see the constant-scale rate. The factor depends on the
    global step alone: every rank and a resumed run use the same.
    """
    groups = selection_groups(optimizer.param_groups)
    saved = [g["lr"] for g in groups]
    for group in groups:
        group["lr"] = group["lr"] * factor
    try:
        yield
    finally:
        for group, lr in zip(groups, saved, strict=True):
            group["lr"] = lr


class SelectionSchedule:
    """LightningModule mixin: the logits' warm-up and rate schedule of ``self.selection``.

    Subclasses that override :meth:`on_before_optimizer_step` or :meth:`optimizer_step` call
    ``super()``.
    """

    selection: SelectionSettings
    model: nn.Module
    trainer: L.Trainer
    _selection_steps: int | None = None  # the run's optimizer steps, read at train start
    _selection_lr_factor = 1.0  # the factor in force while a step runs

    def _run_steps(self) -> int | None:
        """The run's length for the schedule (read once a fit, at train start)."""
        if self._selection_steps is None:  # a subclass's on_train_start that skipped super()
            return self.selection.run_steps(self.trainer)
        return self._selection_steps

    def on_train_start(self) -> None:
        """Read the run's length once; refuse, before any step, an unknown one it needs."""
        # Not in on_fit_start: the length would set up the data loaders early, out of the
        # order a resumed run restores its random state in.
        self._selection_steps = self.selection.run_steps(self.trainer)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """No selection-logit update during the warm-up (``selection_warmup``)."""
        total = self._run_steps()
        if total is not None:
            freeze_selection_logits(self.model, self.trainer.global_step, total,
                                    self.selection.warmup)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Any = None) -> None:
        """Step with the logits' rate of this point of the run (``selection_lr_scale_end``)."""
        total = self._run_steps()
        if total is not None:
            self._selection_lr_factor = self.selection.lr_factor(self.trainer.global_step, total)
        try:
            with ramped_selection_lr(optimizer, self._selection_lr_factor):
                super().optimizer_step(epoch, batch_idx, optimizer,  # type: ignore[misc]
                                       optimizer_closure)
        finally:
            self._selection_lr_factor = 1.0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the constant-scale rate even when a checkpoint is written inside a step.

        A signal handler (SLURM's requeue) can save while the step's factor is in force.
        """
        if self._selection_lr_factor != 1.0:
            for state in checkpoint.get("optimizer_states", []):
                for group in selection_groups(state.get("param_groups", [])):
                    group["lr"] = group["lr"] / self._selection_lr_factor


def check_shared_checkpoint(state_dict: dict[str, object], share: bool) -> None:
    """Refuse per-layer selection logits for a module whose layers share one set.

    Loading them would copy every layer's logits into the one shared Parameter in turn, so the
    last layer's would silently win.

    Raises:
        ConfigError: If ``share`` and the checkpoint's layers hold different logits.
    """
    if not share:
        return
    logits = [v for k, v in state_dict.items()
              if k.endswith(".logits") and isinstance(v, torch.Tensor)]
    if any(v.shape != logits[0].shape or not torch.equal(v, logits[0]) for v in logits[1:]):
        raise ConfigError("this checkpoint was trained with one selection per FlexAct layer, "
                          "but the module shares one (share_selection): build it with "
                          "share_selection=False (and selection_warmup=0, as it was trained)")
