"""Activation sites of a network, and copies of it with one candidate at every site.

A site is a FlexAct layer, or an activation module of a registered class (``nn.ReLU``,
``nn.GELU``, ...) or an :class:`~flexact.nn.expressions.Expression`. ``nn.Identity`` is not a
site: networks use it as a placeholder (a stripped classifier, a skip path), not as an
activation. A FlexAct layer's own candidates are part of that layer, not sites of their own.
"""

from __future__ import annotations

import copy

from torch import nn

from flexact.errors import ConfigError
from flexact.nn.expressions import Expression
from flexact.nn.layer import FlexAct
from flexact.nn.registry import candidate_for, get_activation

__all__ = ["activation_sites", "with_activation"]


def activation_sites(model: nn.Module) -> list[str]:
    """Qualified names of the sites, outermost first.

    Raises:
        ConfigError: If the network has none.
    """
    sites: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, FlexAct) or isinstance(child, Expression) or (
                    candidate_for(child) is not None and not isinstance(child, nn.Identity)):
                sites.append(path)
            else:
                visit(child, path + ".")

    visit(model, "")
    if not sites:
        raise ConfigError("the model has no activation sites to probe: give it FlexAct layers "
                          "(model.init_args.flexact) or a backbone with an `activation` "
                          "argument")
    return sites


def with_activation(model: nn.Module, candidate: str, sites: list[str] | None = None,
                    inplace: bool = False) -> nn.Module:
    """The model (a deep copy unless ``inplace``) with ``candidate`` at every site.

    Weights are shared with nothing and equal to the original's, so copies for different
    candidates differ only in their activations.
    """
    out = model if inplace else copy.deepcopy(model)
    for path in activation_sites(out) if sites is None else sites:
        parent_name, _, name = path.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, name, get_activation(candidate))
    return out
