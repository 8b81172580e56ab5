"""Gumbel-Softmax sampling: finite for every τ > 0, on the device, outside autocast."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gumbel_softmax"]

_U_MIN = torch.finfo(torch.float32).tiny
_U_MAX = 1.0 - torch.finfo(torch.float32).eps


def gumbel_softmax(logits: Tensor, temperature: Tensor, hard: bool = False) -> Tensor:
    """A sample of GumbelSoftmax(logits, τ) along the last dimension.

    The noise is sampled in float32 from clamped uniforms on the logits' device, so it is
    finite for every τ > 0, never synchronizes with the host, and ignores autocast.

    Args:
        logits: Selection logits ``(..., p)``.
        temperature: τ as a 0-d tensor (a buffer: reading it would synchronize).
        hard: Straight-through: exactly one-hot forward weights, the soft sample's gradients.
    """
    if torch.is_autocast_enabled(logits.device.type):
        with torch.autocast(device_type=logits.device.type, enabled=False):
            soft = _soft_sample(logits, temperature)
    else:  # entering a disabled autocast costs as much as the sampling itself on a small layer
        soft = _soft_sample(logits, temperature)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    # (soft - soft.detach()) is exactly zero, so the forward weights are exactly one-hot.
    return one_hot + (soft - soft.detach())


def _soft_sample(logits: Tensor, temperature: Tensor) -> Tensor:
    dtype = torch.promote_types(logits.dtype, torch.float32)
    u = torch.rand(logits.shape, device=logits.device, dtype=torch.float32)
    minus_gumbel = u.clamp_(_U_MIN, _U_MAX).log_().neg_().log_()  # log(−log u) = −g, in place
    scores = (logits.to(dtype) - minus_gumbel.to(dtype)) / temperature.to(dtype)
    return torch.softmax(scores, dim=-1)
