"""Which parameters are selection parameters: optimizer groups, and DDP's unused ones.

Selection logits and activation shape parameters (PReLU slopes, adaptive α, Swish β) get no
weight decay by default: decay would pull every pick toward uniform. A committed FlexAct layer
applies its pick only, so its logits (and, per layer, the other candidates' parameters) get no
gradient, which plain DDP treats as an error unless it searches the graph every step
(``find_unused_parameters``); adding them to the loss with weight 0 keeps plain DDP working.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from flexact.nn.layer import FlexAct, flexact_layers
from flexact.nn.registry import is_activation_module

__all__ = ["LR_SCALE_KEY", "parameter_groups", "scale_selection_lr", "selection_groups",
           "unused_selection_parameters"]

LR_SCALE_KEY = "selection_lr_scale"
"""Key of the selection-logit parameter group: its learning rate over the optimizer's."""


def parameter_groups(model: nn.Module, decay_selection: bool = False) -> list[dict[str, Any]]:
    """Optimizer parameter groups in which selection parameters get ``weight_decay=0``.

    The selection logits get a group of their own, marked with :data:`LR_SCALE_KEY` (1.0),
    so that :func:`scale_selection_lr` can give them their own learning rate.

    Args:
        model: Any model with FlexAct layers or registered activations.
        decay_selection: The optimizer's decay applies to selection parameters too.
    """
    regular: list[nn.Parameter] = []
    shape: list[nn.Parameter] = []  # activation shape parameters: PReLU slopes, Swish β …
    logits: list[nn.Parameter] = []
    seen: set[int] = set()  # a Parameter shared by several modules (share_selection) once
    for module in model.modules():
        exempt = isinstance(module, FlexAct) or is_activation_module(module)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, FlexAct) and name == "logits":
                logits.append(param)
            else:
                (shape if exempt else regular).append(param)
    no_decay: dict[str, Any] = {} if decay_selection else {"weight_decay": 0.0}
    groups = [{"params": regular + (shape if decay_selection else [])},
              {"params": [] if decay_selection else shape, **no_decay},
              {"params": logits, LR_SCALE_KEY: 1.0, **no_decay}]
    return [g for g in groups if g["params"]]


def scale_selection_lr(optimizer: Any, scale: float) -> None:
    """Give the selection logits ``scale`` × the learning rate of the optimizer's groups.

    Call it on an optimizer built from :func:`parameter_groups`, before any scheduler (which
    takes each group's learning rate as its base). The logits' gradient is a small, noisy
    Gumbel-Softmax estimate: at the weights' learning rate they barely move in a short run
    (docs/method.md, "Selection learning rate").

    Args:
        optimizer: A ``torch.optim.Optimizer`` (or anything with ``param_groups``).
        scale: The selection logits' learning rate over the optimizer's (> 0).
    """
    if scale <= 0:
        raise ValueError(f"selection_lr_scale must be > 0, got {scale!r}")
    for group in selection_groups(optimizer.param_groups):
        group["lr"] = group["lr"] / group[LR_SCALE_KEY] * scale
        group[LR_SCALE_KEY] = scale


def selection_groups(param_groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The selection logits' groups (:data:`LR_SCALE_KEY`) with a numeric learning rate.

    ``param_groups``: an optimizer's, or those of its saved state dict.
    """
    return [g for g in param_groups if LR_SCALE_KEY in g and isinstance(g.get("lr"), (int, float))]


def unused_selection_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that committed FlexAct layers of ``model`` leave out of the forward."""
    unused: list[nn.Parameter] = []
    for _, layer in flexact_layers(model):
        if not layer.committed:  # pruned candidates take no part either
            live = set(layer.live_names)
            for name, candidate in zip(layer.candidate_names, layer.candidates, strict=True):
                if name not in live:
                    unused.extend(candidate.parameters())
            continue
        unused.append(layer.logits)
        if layer.num_channels is None:  # per channel, every candidate is evaluated
            pick = layer.committed_index
            for j, candidate in enumerate(layer.candidates):
                if j != pick:
                    unused.extend(candidate.parameters())
    return list({id(p): p for p in unused if p.requires_grad}.values())
