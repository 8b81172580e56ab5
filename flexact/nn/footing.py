"""Selection gradients that compare candidates on equal footing (``selection_gradient``).

The gradient a mixture ``y = Σⱼ wⱼ fⱼ(x)`` sends to the weight of candidate ``j`` is
``⟨∂L/∂y, fⱼ(x)⟩``: it grows with the size of ``fⱼ``'s output and carries its offset, so a
candidate with large outputs (Identity, ReLU) wins the selection for its scale rather than its
shape, the bias docs/method.md §2 describes. Standardized, the weights receive
``⟨∂L/∂y, (fⱼ(x) − μⱼ)/σⱼ⟩`` instead, with ``μⱼ, σⱼ`` the batch mean and standard deviation of
``fⱼ(x)`` (per channel for per-channel selections). Only the weights' gradient changes: the
forward value and every other gradient are those of the plain mixture. The moments are each
device's own batch's (DDP then averages the gradients, as for the raw gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flexact.nn.kernels import broadcast_weights, stacked_outputs

__all__ = ["add_offset", "standardized_mixture", "standardized_weights"]


def standardized_weights(x: Tensor, weights: Tensor, candidates: Sequence[nn.Module],
                         channel_dim: int | None) -> tuple[Tensor, Tensor]:
    """Mixture weights and an offset whose mixture's weight gradient uses standardized outputs.

    ``⟨g, (fⱼ − μⱼ)/σⱼ⟩ = (⟨g, fⱼ⟩ − μⱼ·Σg)/σⱼ``: the plain mixture's gradient to a weight,
    divided by σⱼ, minus μⱼ/σⱼ times the summed output gradient. So the mixture is taken with
    ``wⱼ' = stop(wⱼ) + (wⱼ − stop(wⱼ))/σⱼ`` (equal to ``wⱼ``) and ``Σⱼ (wⱼ − stop(wⱼ))·(−μⱼ/σⱼ)``
    (zero) is added to its output: two moments per candidate, no stored candidate outputs.

    Args:
        x: The layer input.
        weights: The mixture weights, ``(k,)`` or ``(C, k)`` (differentiable).
        candidates: The live candidate modules, in the order of ``weights``' last dimension.
        channel_dim: The channel dimension of ``x`` for per-channel weights, else ``None``.

    A candidate whose output does not vary over the batch (or a channel's), a single sample
    included, has no shape to compare: its weight gets no gradient.

    Returns:
        ``(weights', offset)``: mix with ``weights'`` in place of ``weights``, then add the
        float32 ``offset`` (zero, shaped to broadcast against the output) with
        :func:`add_offset`.
    """
    with torch.no_grad():
        # One contiguous reduction for all candidates: kernels are what a small head pays for.
        rows = _rows(stacked_outputs(x, candidates).float(), weights, channel_dim)
        mean, inverse = _moments(rows)
        mean, inverse = mean.T.reshape(weights.shape), inverse.T.reshape(weights.shape)
    delta = weights - weights.detach()
    offset = -(delta.float() * (mean * inverse)).sum(dim=-1)  # () or (C,)
    if channel_dim is not None:  # (C,) → broadcast along x's channel dimension
        shape = [1] * x.dim()
        shape[channel_dim] = weights.shape[0]
        offset = offset.reshape(shape)
    return weights.detach() + delta * inverse.to(weights.dtype), offset


class _AddOffset(torch.autograd.Function):
    """``out`` unchanged; the offset's gradient, ``Σ ∂L/∂out``, summed in float32."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, offset: Tensor) -> Tensor:
        ctx.offset_shape = offset.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, grad.float().sum_to_size(ctx.offset_shape)


def add_offset(out: Tensor, offset: Tensor) -> Tensor:
    """``out + offset`` for the zero ``offset`` of :func:`standardized_weights`.

    Its gradient ``μⱼ/σⱼ · Σ ∂L/∂out`` nearly cancels the mixture's ``⟨∂L/∂out, fⱼ⟩/σⱼ``: the
    sum is taken in float32 even for a bfloat16 ``out``, whose rounding μⱼ/σⱼ would amplify.
    """
    return _AddOffset.apply(out, offset)


def _rows(outputs: Tensor, weights: Tensor, channel_dim: int | None) -> Tensor:
    """Stacked outputs ``(k, *x.shape)`` as ``(k, C, N)``: C = 1 for per-layer weights."""
    if channel_dim is None:
        return outputs.reshape(outputs.shape[0], 1, -1)
    return outputs.movedim(channel_dim + 1, 1).reshape(outputs.shape[0], weights.shape[0], -1)


def _moments(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and inverse standard deviation over the last dimension, ``(k, C)`` each."""
    # Two passes, not torch.std_mean: its single-pass kernel is ~9x slower on the CPU here.
    mean = rows.mean(dim=2, keepdim=True)
    std = ((rows - mean).square().sum(dim=2) / (rows.shape[2] - 1)).sqrt()  # N = 1: NaN
    # 0 for a constant output, and for one sample, where std is NaN (NaN > ε is false)
    inverse = torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.zeros_like(std))
    return mean.squeeze(2), inverse


class _StandardizedMixture(torch.autograd.Function):
    """``Σⱼ wⱼ fⱼ`` from stacked outputs; the weights get ``(⟨g, fⱼ⟩ − μⱼ Σg)/σⱼ``."""

    @staticmethod
    def forward(ctx: Any, outputs: Tensor, weights: Tensor, channel_dim: int | None) -> Tensor:
        ctx.channel_dim = channel_dim
        ctx.save_for_backward(outputs, weights)
        return (outputs * broadcast_weights(weights, outputs, channel_dim)).sum(0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor, None]:
        outputs, weights = ctx.saved_tensors
        d = ctx.channel_dim
        rows = _rows(outputs, weights, d)  # (k, C, N)
        g = _rows(grad.unsqueeze(0), weights, d)  # (1, C, N)
        mean, inverse = _moments(rows)
        inner = (rows * g).sum(dim=2)
        weight_grad = ((inner - mean * g.sum(dim=2)) * inverse).T.reshape(weights.shape)
        outputs_grad = (grad.unsqueeze(0) * broadcast_weights(weights, outputs, d)
                        if ctx.needs_input_grad[0] else None)
        return outputs_grad, weight_grad, None


def standardized_mixture(x: Tensor, weights: Tensor, candidates: Sequence[nn.Module],
                         channel_dim: int | None) -> Tensor:
    """The mixture of :func:`standardized_weights` in one function, for small inputs.

    The candidates' outputs are evaluated once and kept for backward (at most
    :data:`~flexact.nn.kernels.SMALL_INPUT` elements each), and the weights' gradient is
    computed from them directly: no offset, a third of the kernels. Not for half precision
    (:func:`~flexact.nn.kernels.takes_small_path`).

    Args:
        x: The layer input.
        weights: The mixture weights, ``(k,)`` or ``(C, k)`` (differentiable).
        candidates: The live candidate modules, in the order of ``weights``' last dimension.
        channel_dim: The channel dimension of ``x`` for per-channel weights, else ``None``.

    Returns:
        ``Σⱼ wⱼ fⱼ(x)``, shaped like ``x``.
    """
    return _StandardizedMixture.apply(stacked_outputs(x, candidates), weights, channel_dim)
