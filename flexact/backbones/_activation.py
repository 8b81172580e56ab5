"""Activation sites of the backbones: a registry name, or a FlexAct layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from flexact.activations import check_activation_name, get_activation
from flexact.errors import ConfigError
from flexact.layers import FlexAct

__all__ = ["FLEXACT_NAMES", "build_activation", "check_backbone_activation", "norm_activation"]

FLEXACT_NAMES = ("flexact", "flexact_channel")
"""Names the backbones accept besides the registry: a FlexAct layer at every activation site,
with one selection per site (``flexact``) or one per channel (``flexact_channel``)."""


def check_backbone_activation(name: str) -> str:
    """Return ``name`` if it is a registry name or one of :data:`FLEXACT_NAMES`.

    Raises:
        ConfigError: Otherwise, listing the valid names.
    """
    if name in FLEXACT_NAMES:
        return name
    try:
        return check_activation_name(name)
    except ConfigError as err:
        raise ConfigError(f"{err}; backbones also accept {', '.join(FLEXACT_NAMES)}") from None


def build_activation(name: str, num_channels: int | None = None,
                     kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A fresh activation module for one site of a backbone.

    Args:
        name: A registry name (``relu``, ``adaptive_gumbel``, ...), ``flexact`` (a
            :class:`~flexact.FlexAct` with the paper's candidates, one selection for the site) or
            ``flexact_channel`` (one selection per channel, dimension 1 of the input).
        num_channels: Channels at this site (needed for ``flexact_channel``).
        kwargs: Keyword arguments for the activation (e.g. ``{"negative_slope": 0.2}``, or
            FlexAct's ``candidates``, ``tau``, ``kl_lambda``).

    Returns:
        The module.
    """
    options = dict(kwargs or {})
    check_backbone_activation(name)
    if name in FLEXACT_NAMES:
        # FlexAct at every site: keep inputs for backward in bf16 unless asked otherwise (see
        # flexact.swap_activations), so the network stays within 1.25× a ReLU network's memory.
        options.setdefault("compact_memory", True)
    if name == "flexact":
        return FlexAct(**options)
    if name == "flexact_channel":
        if num_channels is None:
            raise ConfigError("flexact_channel needs the number of channels at the site")
        options.update(granularity="channel", num_channels=num_channels, channel_dim=1)
        return FlexAct(**options)
    return get_activation(name, **options)


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
