"""Activation sites of the backbones: a registry name, or a FlexAct layer from a spec."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from flexact.errors import ConfigError
from flexact.nn.layer import FlexAct
from flexact.nn.registry import check_activation_name, get_activation
from flexact.nn.spec import FlexActSpec

__all__ = ["FLEXACT_NAMES", "Activation", "build_activation", "check_backbone_activation",
           "norm_activation"]

FLEXACT_NAMES = ("flexact", "flexact_channel")
"""Names the backbones accept besides the registry and a :class:`~flexact.FlexActSpec`: a
FlexAct layer at every activation site (settings from ``activation_kwargs``), with one
selection per site (``flexact``) or one per channel (``flexact_channel``)."""

Activation = str | FlexActSpec
"""A backbone's ``activation`` argument: a registry name, a FlexAct alias, or a spec."""


def check_backbone_activation(name: Activation) -> Activation:
    """Return ``name`` if it is a spec, a registry name or one of :data:`FLEXACT_NAMES`.

    Raises:
        ConfigError: Otherwise, listing the valid names.
    """
    if isinstance(name, FlexActSpec) or name in FLEXACT_NAMES:
        return name
    try:
        return check_activation_name(name)
    except ConfigError as err:
        raise ConfigError(f"{err}; backbones also accept {', '.join(FLEXACT_NAMES)}") from None


def build_activation(name: Activation, num_channels: int | None = None,
                     kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A fresh activation module for one site of a backbone.

    Args:
        name: A registry name (``relu``, ``adaptive_gumbel``, ...), a
            :class:`~flexact.FlexActSpec` (a :class:`~flexact.FlexAct` per site with those
            settings; per channel along dimension 1 if its granularity is ``channel``),
            ``flexact`` (a FlexAct with the settings in ``kwargs``) or ``flexact_channel``
            (the same, one selection per channel).
        num_channels: Channels at this site (needed for ``flexact_channel``).
        kwargs: Keyword arguments for the activation (e.g. ``{"negative_slope": 0.2}``, or
            FlexAct's ``candidates``, ``tau``, ``kl_lambda``).

    Returns:
        The module.
    """
    check_backbone_activation(name)
    if isinstance(name, str) and name not in FLEXACT_NAMES:
        return get_activation(name, **dict(kwargs or {}))
    if isinstance(name, FlexActSpec):
        spec = FlexActSpec.build(name, **dict(kwargs or {}))
    else:
        # The aliases keep inputs for backward in bf16 unless asked otherwise (see
        # flexact.swap_activations): within 1.25× a ReLU network's memory.
        options = {"compact_memory": True, **dict(kwargs or {})}
        if name == "flexact_channel":
            options["granularity"] = "channel"
        spec = FlexActSpec.build(None, **options)
    if spec.granularity == "channel":
        if num_channels is None:
            raise ConfigError("a per-channel FlexAct needs the number of channels at the site")
        return FlexAct(spec, num_channels=num_channels, channel_dim=1)
    return FlexAct(spec)


def norm_activation(act: nn.Module, norm: nn.Module, z: Tensor,
                    residual: Tensor | None = None) -> Tensor:
    """``act(norm(z) + residual)``.

    A FlexAct site takes its fused path, which stores no copy of ``norm(z) + residual`` for
    backward (:meth:`FlexAct.forward_batchnorm`).
    """
    if isinstance(act, FlexAct):
        return act.forward_batchnorm(z, norm, residual)
    x = norm(z)
    return act(x if residual is None else x + residual)
