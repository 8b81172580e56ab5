"""Closed-form mixtures of the built-in candidates: each basis function evaluated once.

ReLU, LeakyReLU, Identity, Sigmoid and Tanh are all linear combinations of five basis
functions, ``relu(x)``, ``x``, ``σ(x)``, ``σ(2x)`` and ``1`` (``tanh(x) = 2σ(2x) − 1``,
``leaky_relu(x) = (1 − s)·relu(x) + s·x``). A mixture ``Σⱼ wⱼ fⱼ(x)`` of such candidates is
therefore ``Σₖ βₖ bₖ(x)`` with ``β = w·C`` for a fixed coefficient matrix ``C``: every basis
function is evaluated once, however many candidates share it, and the forward is a handful of
element-wise passes. Tanh also goes through the sigmoid kernel, several times faster than
``torch.tanh`` on CPUs. The backward needs only ``x``; the weight gradients are four inner
products. The regularizer's gradient norms (docs/method.md eq. 1) come out of the same forward from
the ``σ`` values it has already computed, instead of differentiating every candidate again.

After a batch norm, :func:`batchnorm_mixture` (behind :meth:`flexact.FlexAct.forward_batchnorm`)
also folds the batch norm and a residual addition into the same autograd step, so that the
layer's input is recomputed in backward instead of stored.

Pure PyTorch; :func:`flexact.nn.mixture.mixture` and :class:`flexact.nn.layer.FlexAct` take
this path
whenever every candidate is one of the five built-ins, and the general one otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from flexact.nn.basis import _ONE, _RELU, _SIG, _SIG2, _X, BASIS, _constants, basis_row, basis_rows
from flexact.nn.ops import (
    _SMOOTH,
    _accumulation_dtype,
    _column,
    _compute_dtype,
    _group_dims,
    _inner,
    _mix,
    _sigmoid_into,
    _sum_over,
    _sum_sq,
)

__all__ = ["BASIS", "basis_row", "basis_rows", "closed_form_mixture", "stacked_outputs",
           "takes_small_path"]

def _mixture_forward(
    x: Tensor,
    beta: Tensor,
    squares: Tensor,
    used: tuple[bool, ...],
    channel_dim: int | None,
    want_norms: bool,
) -> tuple[Tensor, Tensor]:
    """``(Σₖ βₖ bₖ(x), ḡ)``; ḡ is an empty tensor unless ``want_norms``.

    Large tensors are few on purpose: on CPUs every fresh activation-sized tensor costs page
    faults comparable to a pass over it, so this allocates two (the output and one scratch
    buffer that holds each basis in turn).
    """
    beta_x = beta.to(x.dtype)  # cast once: every column below is then a view

    def col(k: int) -> Tensor:
        return _column(beta_x, k, x, channel_dim)

    dims = _group_dims(x, channel_dim)
    # Statistics per group, by basis column: #(x > 0), Σσ'(x)², Σσ'(2x)² (see _constants).
    stats: list[Tensor | None] = [None, None, None, None]
    out: Tensor | None = None
    if used[_X]:  # with the constant basis in the same pass
        out = torch.addcmul(col(_ONE), x, col(_X)) if used[_ONE] else torch.mul(x, col(_X))
    buf: Tensor | None = None
    if used[_RELU]:
        buf = torch.relu(x)
        out = buf * col(_RELU) if out is None else out.addcmul_(buf, col(_RELU))
        if want_norms:
            stats[0] = _sum_over(buf.sign_(), dims)
    for k, scale in _SMOOTH:
        if not used[k]:
            continue
        buf = _sigmoid_into(torch.empty_like(x) if buf is None else buf, x, scale)
        out = buf * col(k) if out is None else out.addcmul_(buf, col(k))
        if want_norms:  # σ' = σ − σ², in place
            stats[k] = _sum_sq(buf.addcmul_(buf, buf, value=-1), dims)
    if out is None:  # only the constant basis
        out = torch.zeros_like(x)
    if used[_ONE] and not used[_X]:
        out.add_(col(_ONE))
    if want_norms:
        return out, _gradient_norms(x, stats, squares, dims, channel_dim)
    return out, x.new_empty(0, dtype=_accumulation_dtype(x))


def _mixture_backward(
    x: Tensor,
    grad_out: Tensor,
    beta: Tensor,
    weights_dtype: torch.dtype,
    coefficients: Tensor,
    used: tuple[bool, ...],
    channel_dim: int | None,
    need_w: bool,
) -> tuple[Tensor, Tensor | None]:
    """``(∂L/∂x, ∂L/∂w)`` of the mixture from ``∂L/∂out`` (two activation-sized allocations)."""
    beta_x = beta.to(x.dtype)  # cast once: every column below is then a view

    def col(k: int) -> Tensor:
        return _column(beta_x, k, x, channel_dim)

    parts: list[Tensor | None] = [None] * len(BASIS)  # Σ grad·bₖ(x), the gradient of βₖ
    grad_x: Tensor | None = None
    if used[_RELU]:
        # grad·relu'(x) with ReLU's own backward kernel; Σ grad·relu(x) = Σ that·x.
        grad_x = torch.ops.aten.threshold_backward(grad_out, x, 0)
        if need_w:
            parts[_RELU] = _inner(grad_x, x, channel_dim)
        grad_x.mul_(col(_RELU))
    if used[_X]:
        if need_w:
            parts[_X] = _inner(grad_out, x, channel_dim)
        grad_x = grad_out * col(_X) if grad_x is None else grad_x.addcmul_(grad_out, col(_X))
    if used[_ONE] and need_w:
        parts[_ONE] = _sum_over(grad_out, tuple(d for d in range(x.dim()) if d != channel_dim))
    buf: Tensor | None = None
    for k, scale in _SMOOTH:
        if not used[k]:
            continue
        buf = _sigmoid_into(torch.empty_like(x) if buf is None else buf, x, scale)
        if need_w:
            parts[k] = _inner(grad_out, buf, channel_dim)
        # d/dx σ(a·x) = a·σ'(a·x), σ' = σ − σ²
        buf.addcmul_(buf, buf, value=-1).mul_(scale * col(k))
        grad_x = buf * grad_out if grad_x is None else grad_x.addcmul_(buf, grad_out)
    if grad_x is None:  # only the constant basis: no dependence on x
        grad_x = torch.zeros_like(grad_out)

    grad_w = None
    if need_w:
        if any(p is None for p in parts):
            zero = beta.new_zeros(beta.shape[:-1])
            parts = [zero if p is None else p for p in parts]
        grad_beta = torch.stack(parts, dim=-1)  # type: ignore[arg-type]
        grad_w = (grad_beta.unsqueeze(-2) * coefficients.to(grad_beta.dtype)).sum(-1)
        grad_w = grad_w.to(weights_dtype)
    return grad_x, grad_w


class _ClosedFormMixture(torch.autograd.Function):
    """``Σₖ βₖ bₖ(x)`` with ``β = w·C``; saves ``x`` (optionally bf16) and the small tensors."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weights: Tensor,
        coefficients: Tensor,
        squares: Tensor,
        used: tuple[bool, ...],
        channel_dim: int | None,
        save_dtype: torch.dtype | None,
        want_norms: bool,
    ) -> tuple[Tensor, Tensor]:
        beta = _mix(weights, coefficients)
        ctx.used, ctx.channel_dim, ctx.input_dtype = used, channel_dim, x.dtype
        compact = save_dtype is not None and save_dtype != x.dtype
        ctx.weights_dtype = weights.dtype
        ctx.save_for_backward(x.to(save_dtype) if compact else x, coefficients, beta)
        out, norms = _mixture_forward(x.to(_compute_dtype(x)), beta, squares, used, channel_dim,
                                      want_norms)
        ctx.mark_non_differentiable(norms)
        return out.to(x.dtype), norms

    @staticmethod
    @once_differentiable  # a second derivative would miss β's dependence on the weights
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: Tensor, _grad_norms: Tensor
    ) -> tuple[Tensor | None, ...]:
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            return _ClosedFormMixture._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, coefficients, beta = ctx.saved_tensors
        dtype = _compute_dtype(grad_out)
        grad_x, grad_w = _mixture_backward(
            x.to(dtype), grad_out.to(dtype), beta, ctx.weights_dtype, coefficients, ctx.used,
            ctx.channel_dim, ctx.needs_input_grad[1])
        grad_x = grad_x.to(ctx.input_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, *([None] * 6)


def _gradient_norms(
    x: Tensor,
    stats: list[Tensor | None],
    squares: Tensor,
    dims: tuple[int, ...],
    channel_dim: int | None,
) -> Tensor:
    """Batch-mean gradient norm of every candidate from the per-group statistics."""
    size = 1
    for d in dims:
        size *= x.shape[d]
    dtype = _accumulation_dtype(x)
    squares = squares.to(dtype)
    # One group per sample (and channel); absent statistics are zero.
    shape = (x.shape[0],) if channel_dim is None else (x.shape[0], x.shape[channel_dim])
    present = [stats[k] for k in (_RELU, _SIG, _SIG2)]
    zero = None if all(t is not None for t in present) else x.new_zeros((), dtype=dtype)
    table = torch.stack([(zero if t is None else t).expand(shape) for t in present], dim=-1)
    # In float32 even under autocast (which would run the matmul in bf16).
    with torch.autocast(device_type=x.device.type, enabled=False):
        squared = torch.addmm(squares[3] * size, table.reshape(-1, 3), squares[:3])
    return squared.sqrt_().reshape(*shape, -1).mean(0)


SMALL_INPUT = 16384
"""Inputs of at most this many elements take plain autograd on stacked outputs: faster on
CPUs up to about 20 000 elements with the raw selection gradient and 40 000 standardized
(one thread, forward and backward of five candidates), at most 320 kB of saved outputs."""


def takes_small_path(x: Tensor, want_norms: bool = False,
                     save_dtype: torch.dtype | None = None) -> bool:
    """Whether :func:`closed_form_mixture` mixes ``x`` from the candidates' stacked outputs.

    Not for half-precision inputs: the closed form evaluates them in float32, and the weights'
    gradients need it (bf16 outputs: 0.1 relative error in the standardized gradient).
    """
    return (x.numel() <= SMALL_INPUT and not (want_norms and x.dim() >= 2)
            and save_dtype is None and x.dtype not in (torch.bfloat16, torch.float16))


def stacked_outputs(x: Tensor, candidates: Sequence[nn.Module]) -> Tensor:
    """Every candidate's output, ``(p, *x.shape)``: the small paths' input."""
    return torch.stack([c(x) for c in candidates])


def broadcast_weights(weights: Tensor, outputs: Tensor, channel_dim: int | None) -> Tensor:
    """``weights`` ``(p,)`` or ``(C, p)`` shaped to broadcast against ``outputs`` ``(p, ...)``."""
    shape = [1] * (outputs.dim() - 1)
    if channel_dim is not None:
        shape[channel_dim] = weights.shape[0]
    return weights.to(outputs.dtype).movedim(-1, 0).reshape(weights.shape[-1], *shape)


def closed_form_mixture(
    x: Tensor,
    weights: Tensor,
    candidates: Sequence[nn.Module],
    channel_dim: int | None = None,
    save_dtype: torch.dtype | None = None,
    want_norms: bool = False,
) -> tuple[Tensor, Tensor | None] | None:
    """The mixture ``Σⱼ wⱼ fⱼ(x)`` through the closed form, or ``None`` if a candidate lacks one.

    Args:
        x: Input.
        weights: ``(p,)`` mixture weights, or ``(C, p)`` per channel along ``channel_dim``.
        candidates: The ``p`` candidate modules.
        channel_dim: Non-negative channel dimension of ``x`` for per-channel weights.
        save_dtype: Keep ``x`` for backward in this dtype.
        want_norms: Also return the batch-mean gradient norm ḡ of every candidate w.r.t. ``x``
            (``(p,)``, or ``(C, p)`` per channel); ``None`` for an input without a batch
            dimension (``x.dim() < 2``).

    Inputs that :func:`takes_small_path` (at most :data:`SMALL_INPUT` elements, no ḡ) are
    mixed with plain autograd ops (same values and gradients, fewer dispatches).

    Returns:
        ``(output, ḡ or None)``, or ``None`` when the general path must be taken.
    """
    rows = basis_rows(candidates)
    if rows is None:
        return None
    if takes_small_path(x, want_norms, save_dtype):
        # Tiny inputs (heads, small MLPs): a handful of dispatched ops cost less than the
        # custom function's bookkeeping, and the saved outputs are a few kilobytes. Stacked
        # outputs times broadcast weights: no per-candidate select in forward or backward.
        outs = stacked_outputs(x, candidates)
        return (outs * broadcast_weights(weights, outs, channel_dim)).sum(0), None
    want_norms = want_norms and x.dim() >= 2  # ḡ needs a batch dimension
    coefficients, squares, used = _constants(rows, x.device, _accumulation_dtype(weights))
    out, norms = _ClosedFormMixture.apply(
        x, weights, coefficients, squares, used, channel_dim, save_dtype, want_norms
    )
    return out, (norms if want_norms else None)


