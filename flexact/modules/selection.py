"""How the selection logits learn: defaults for a FlexAct head and for FlexAct everywhere.

The two settings answer different questions and were chosen apart against a sweep of
fixed-activation runs (benchmarks/RESULTS.md, "One FlexAct run vs a sweep"; docs/method.md §5;
for FlexAct everywhere the measured gain is decisiveness, 88 % of layers against 33 %, with
picks as often within the sweep's noise as before):

- **Head only** (``swap_backbone`` off): the logits learn from the first step at 10 × the
  optimizer's rate, each FlexAct layer on its own.
- **Everywhere** (``swap_backbone`` on): one selection for the whole network (the question a
  sweep answers), the logits held fixed for the first 30 % of training while the weights fit
  under the uniform mixture, then learning at 100 × the optimizer's rate. Early in training the
  loss falls fastest through the most linear candidate, so layers that select from the first
  step drift to Identity and commit there; after the warm-up the logits follow the signal that
  separates the candidates once the weights fit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from flexact.callbacks.progress import run_length
from flexact.errors import ConfigError
from flexact.nn import FlexAct, flexact_layers
from flexact.nn.surgery import share_selection as tie_selections

__all__ = ["EVERYWHERE", "HEAD_ONLY", "SelectionSettings", "check_shared_checkpoint",
           "freeze_selection_logits", "resolve_selection", "selection_logits"]


@dataclass(frozen=True)
class SelectionSettings:
    """How the selection logits learn.

    Args:
        lr_scale: Their learning rate over the optimizer's.
        share: One set of logits for every FlexAct layer.
        warmup: Fraction of training during which they stay fixed.
    """

    lr_scale: float
    share: bool
    warmup: float

    def as_hparams(self) -> dict[str, float | bool]:
        """The module's hyper-parameters of these settings."""
        return {"selection_lr_scale": self.lr_scale, "share_selection": self.share,
                "selection_warmup": self.warmup}


HEAD_ONLY = SelectionSettings(lr_scale=10.0, share=False, warmup=0.0)
EVERYWHERE = SelectionSettings(lr_scale=100.0, share=True, warmup=0.3)


def _shareable(layers: list[FlexAct]) -> bool:
    return all(layer.num_channels is None and layer.candidate_names == layers[0].candidate_names
               for layer in layers)


def resolve_selection(model: nn.Module, swap_backbone: bool, lr_scale: float | None,
                      share: bool | None, warmup: float | None) -> SelectionSettings:
    """The settings a module uses (the given values, the others its mode's defaults), applied.

    Ties the layers' logits together (:func:`flexact.nn.surgery.share_selection`) if shared.

    With FlexAct everywhere, the default shares one selection only where every layer has the
    same candidates and selects per layer (``share_selection: true`` asked for explicitly
    raises in that case instead).

    Args:
        model: The network (its FlexAct layers decide whether sharing is possible).
        swap_backbone: FlexAct everywhere (:data:`EVERYWHERE`), else :data:`HEAD_ONLY`.
        lr_scale: ``selection_lr_scale``, ``None`` for the default.
        share: ``share_selection``, ``None`` for the default.
        warmup: ``selection_warmup``, ``None`` for the default.

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
    return SelectionSettings(defaults.lr_scale if lr_scale is None else float(lr_scale),
                             bool(share), warmup)


def selection_logits(model: nn.Module) -> Iterable[nn.Parameter]:
    """Every FlexAct layer's selection logits, each Parameter once (shared logits too)."""
    return {id(layer.logits): layer.logits for _, layer in flexact_layers(model)}.values()


def freeze_selection_logits(model: nn.Module, trainer: L.Trainer, warmup: float) -> bool:
    """Drop the logits' gradients during the first ``warmup`` of the trainer's optimizer steps.

    With no gradient the optimizer skips them altogether (Adam's moments stay empty), so the
    logits start learning after the warm-up as from scratch. The run's length and position are
    SelectionCommit's (:func:`flexact.callbacks.progress.run_length`, the global step): every
    rank and a resumed run agree on them.

    Returns:
        Whether the logits were frozen at this step.

    Raises:
        ConfigError: If the run has no known, finite length to take the fraction of.
    """
    if warmup <= 0:
        return False
    if trainer.global_step >= warmup * run_length(trainer, "step", None, "selection_warmup"):
        return False
    for logits in selection_logits(model):
        logits.grad = None
    return True


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
