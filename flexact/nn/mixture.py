"""The candidate mixture ``Σⱼ wⱼ σⱼ(x)``, and the per-channel application of picks.

Built-in candidates take the closed form of :mod:`flexact.nn.kernels`; other parameter-free
candidates a custom autograd function that saves only ``x`` and ``w``; candidates with their
own parameters plain autograd.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flexact.nn.kernels import closed_form_mixture
from flexact.nn.ops import _column
from flexact.nn.registry import activation_value_and_derivative, has_parameters

__all__ = ["apply_per_channel", "channel_dim_of", "mixture"]


def _reduce_to_weight(t: Tensor, channel_dim: int | None) -> Tensor:
    """Sum ``t`` over everything but the channel dimension (in float32 for accuracy)."""
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    if channel_dim is None:
        return t.sum()
    dims = [d for d in range(t.dim()) if d != channel_dim]
    return t.sum(dim=dims)


class _FusedMixture(torch.autograd.Function):
    """Σⱼ wⱼ σⱼ(x) for parameter-free σⱼ, saving only ``x`` and ``w`` for backward.

    Backward recomputes each candidate and its derivative, so memory does not grow with the
    number of candidates (a plain autograd sum would keep one output per candidate alive).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weights: Tensor,
        candidates: Sequence[nn.Module],
        channel_dim: int | None,
        save_dtype: torch.dtype | None,
    ) -> Tensor:
        ctx.candidates = candidates
        ctx.channel_dim = channel_dim
        ctx.input_dtype = x.dtype
        compact = save_dtype is not None and save_dtype != x.dtype
        ctx.save_for_backward(x.to(save_dtype) if compact else x, weights)
        out = candidates[0](x) * _column(weights, 0, x, channel_dim)
        for j in range(1, len(candidates)):
            out.add_(candidates[j](x) * _column(weights, j, x, channel_dim))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weights = ctx.saved_tensors
        x = x.to(ctx.input_dtype)
        candidates, channel_dim = ctx.candidates, ctx.channel_dim
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        slope: Tensor | None = None
        columns = []
        # One evaluation per candidate serves both gradients (σ' from σ for sigmoid and tanh).
        for j, act in enumerate(candidates):
            value, derivative = activation_value_and_derivative(act, x)
            if need_x:
                term = derivative.mul_(_column(weights, j, x, channel_dim))
                slope = term if slope is None else slope.add_(term)
            if need_w:
                columns.append(_reduce_to_weight(value.mul_(grad_out), channel_dim))
        grad_x = grad_out * slope if need_x and slope is not None else None
        grad_w = torch.stack(columns, dim=-1).to(weights.dtype) if need_w else None
        return grad_x, grad_w, None, None, None


def mixture(
    x: Tensor,
    weights: Tensor,
    candidates: Sequence[nn.Module],
    channel_dim: int | None = None,
    save_dtype: torch.dtype | None = None,
) -> Tensor:
    """Convex combination ``Σⱼ wⱼ σⱼ(x)`` of candidate activations.

    Built-in candidates (ReLU, LeakyReLU, Identity, Sigmoid, Tanh) take a closed form that
    evaluates each shared basis function once (:mod:`flexact.nn.kernels`); other parameter-free
    candidates go through a memory-saving custom autograd function; candidates with their own
    parameters take the general autograd path.

    Args:
        x: Input tensor.
        weights: ``(p,)`` mixture weights, or ``(C, p)`` per channel when ``channel_dim`` is set.
        candidates: The ``p`` element-wise activation modules.
        channel_dim: Dimension of ``x`` indexed by the rows of a 2-D ``weights``.
        save_dtype: Keep the input for backward in this dtype (e.g. ``torch.bfloat16`` halves
            the memory of a float32 input; gradients are then evaluated at the rounded input).

    Returns:
        A tensor shaped like ``x``.
    """
    if channel_dim is not None:
        channel_dim = channel_dim % x.dim()
    closed = closed_form_mixture(x, weights, candidates, channel_dim, save_dtype)
    if closed is not None:
        return closed[0]
    return _general_mixture(x, weights, candidates, channel_dim, save_dtype)


def _general_mixture(
    x: Tensor,
    weights: Tensor,
    candidates: Sequence[nn.Module],
    channel_dim: int | None,
    save_dtype: torch.dtype | None,
) -> Tensor:
    """:func:`mixture` for candidates without a closed form (``channel_dim`` non-negative)."""
    free = [j for j, act in enumerate(candidates) if not has_parameters(act)]
    learned = [j for j in range(len(candidates)) if j not in free]
    out: Tensor | None = None
    if free:
        sub_weights = weights if len(free) == len(candidates) else weights[..., free]
        out = _FusedMixture.apply(x, sub_weights, [candidates[j] for j in free], channel_dim,
                                  save_dtype)
    for j in learned:
        term = candidates[j](x) * _column(weights, j, x, channel_dim)
        out = term if out is None else out + term
    assert out is not None
    return out


def apply_per_channel(x: Tensor, picks: Tensor, activations: Sequence[nn.Module],
                      channel_dim: int) -> Tensor:
    """Channel ``c`` of ``x`` through ``activations[picks[c]]`` (a per-channel pick).

    Args:
        x: Input.
        picks: ``(C,)`` indices into ``activations``.
        activations: The candidate modules.
        channel_dim: Non-negative dimension of ``x`` that holds the ``C`` channels.
    """
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    index = picks.reshape(shape)
    out = torch.zeros_like(x)
    for j, act in enumerate(activations):
        out = torch.where(index == j, act(x), out)
    return out


def channel_dim_of(x: Tensor, num_channels: int, channel_dim: int) -> int:
    """``channel_dim`` as a non-negative dimension of ``x``, checked to hold ``num_channels``.

    Raises:
        ValueError: If it is the batch dimension, out of range, or of another size.
    """
    if x.dim() < 2 or not -x.dim() <= channel_dim < x.dim() or channel_dim % x.dim() == 0:
        raise ValueError(f"FlexAct channel_dim={channel_dim} is not a non-batch dimension of the "
                         f"input of shape {tuple(x.shape)}")
    resolved = channel_dim % x.dim()
    if x.shape[resolved] != num_channels:
        raise ValueError(f"FlexAct expected {num_channels} channels in dim {channel_dim}, got "
                         f"input of shape {tuple(x.shape)}")
    return resolved

