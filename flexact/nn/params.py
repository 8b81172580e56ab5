"""Which parameters are selection parameters: optimizer groups, and DDP's unused ones.

Selection logits and activation shape parameters (PReLU slopes, adaptive α, Swish β) get no
weight decay by default: decay would pull every pick toward uniform. A committed FlexAct layer
applies its pick only, so its logits (and, per layer, the other candidates' parameters) get no
gradient, which plain DDP treats as an error unless it searches the graph every step
(``find_unused_parameters``); adding them to the loss with weight 0 keeps plain DDP working.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from flexact.nn.layer import FlexAct, flexact_layers
from flexact.nn.registry import is_activation_module

__all__ = ["parameter_groups", "unused_selection_parameters"]


def parameter_groups(model: nn.Module, decay_selection: bool = False) -> list[dict[str, Any]]:
    """Optimizer parameter groups in which selection parameters get ``weight_decay=0``.

    Args:
        model: Any model with FlexAct layers or registered activations.
        decay_selection: One group for everything (the optimizer's decay applies to all).
    """
    regular: list[nn.Parameter] = []
    selection: list[nn.Parameter] = []
    for module in model.modules():
        exempt = isinstance(module, FlexAct) or is_activation_module(module)
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                (selection if exempt else regular).append(param)
    if decay_selection:
        return [{"params": regular + selection}]
    groups = [{"params": regular}, {"params": selection, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


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
    return [p for p in unused if p.requires_grad]
