"""Batch norm (and a residual addition) fused with a closed-form FlexAct mixture.

Behind :meth:`flexact.FlexAct.forward_batchnorm`: in training, ``mixture(bn(z) + residual)``
is one autograd step that keeps only ``z`` (which the batch norm keeps anyway) and recomputes
the normalized input in backward, so a FlexAct site stores no activation-sized tensor of its
own. Running statistics are updated exactly as ``nn.BatchNorm`` updates them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from flexact.nn.basis import _constants
from flexact.nn.kernels import _mixture_backward, _mixture_forward
from flexact.nn.ops import _accumulation_dtype, _compute_dtype, _mix

__all__ = ["batchnorm_mixture", "fusable_batchnorm"]

def _affine(z: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None) -> Tensor:
    """``scale·z + shift (+ residual)`` with per-channel ``scale``/``shift`` along dim 1.

    ``scale·z + shift`` is evaluated with the float32 coefficients and rounded to ``z``'s dtype
    once, as the batch norm's own kernel does (bf16 coefficients would cancel badly for
    channels whose mean is large against their spread); the residual is added in that dtype.
    """
    shape = [1] * z.dim()
    shape[1] = -1
    x = torch.addcmul(shift.reshape(shape), z, scale.reshape(shape)).to(z.dtype)
    return x if residual is None else x.add_(residual)


class _BatchNormMixture(torch.autograd.Function):
    """``mixture(batch_norm(z) + residual)`` in training, keeping only ``z`` and ``residual``.

    Both are kept alive for backward anyway (``z`` by the batch norm, ``residual`` by the
    convolution that reads the block input), so unlike a separate FlexAct, which must keep its
    input, this stores no activation-sized tensor of its own: the normalized input is
    recomputed in backward, one pass. Forward and backward of the batch norm are its own
    kernels (``native_batch_norm`` and ``native_batch_norm_backward``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z: Tensor,
        gamma: Tensor | None,
        shift: Tensor | None,
        residual: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        weights: Tensor,
        coefficients: Tensor,
        squares: Tensor,
        used: tuple[bool, ...],
        channel_dim: int | None,
        want_norms: bool,
    ) -> tuple[Tensor, Tensor]:
        # Statistics, output and running statistics in one call.
        x, mean, invstd = torch.native_batch_norm(
            z, gamma, shift, running_mean, running_var, True, momentum, eps)
        if residual is not None:
            x.add_(residual)
        beta = _mix(weights, coefficients)
        out, norms = _mixture_forward(x.to(_compute_dtype(x)), beta, squares, used, channel_dim,
                                      want_norms)
        out = out.to(x.dtype)
        del x
        ctx.used, ctx.channel_dim, ctx.eps = used, channel_dim, eps
        ctx.has_gamma, ctx.has_shift = gamma is not None, shift is not None
        ctx.has_residual = residual is not None
        ctx.weights_dtype = weights.dtype
        ctx.save_for_backward(z, residual, gamma, shift, coefficients, beta, mean,
                              invstd)
        ctx.mark_non_differentiable(norms)
        return out, norms

    @staticmethod
    @once_differentiable  # a second derivative would miss β's dependence on the weights
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: Tensor, *_unused: Tensor
    ) -> tuple[Tensor | None, ...]:
        # Dtypes are chosen here explicitly: autocast (active if backward is called inside
        # its block) would run the inner products in bf16.
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            return _BatchNormMixture._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        z, residual, gamma, shift, coefficients, beta, mean, invstd = ctx.saved_tensors
        input_dtype, residual_dtype = z.dtype, None if residual is None else residual.dtype
        dtype = _compute_dtype(z)
        stat_gamma = gamma
        if dtype != input_dtype:  # half precision on the CPU: everything below in float32
            z, residual = z.to(dtype), None if residual is None else residual.to(dtype)
            # (a model cast to bf16 has bf16 γ and statistics; the kernel wants one dtype)
            mean, invstd = mean.to(dtype), invstd.to(dtype)
            stat_gamma = None if gamma is None else gamma.to(dtype)
        # The normalized input again: (z − μ)·γ/σ + β (+ residual), one pass.
        scale = invstd if gamma is None else gamma.to(invstd.dtype) * invstd
        bias = mean * -scale if shift is None else torch.addcmul(shift.to(invstd.dtype), mean,
                                                                 scale, value=-1)
        x = _affine(z, scale, bias, residual)
        grad_x, grad_w = _mixture_backward(x, grad_out.to(dtype), beta, ctx.weights_dtype,
                                           coefficients, ctx.used, ctx.channel_dim,
                                           ctx.needs_input_grad[8])
        del x
        grad_residual = None
        if ctx.has_residual and ctx.needs_input_grad[3]:
            grad_residual = grad_x.to(residual_dtype)
        mask = [ctx.needs_input_grad[0], ctx.has_gamma and ctx.needs_input_grad[1],
                ctx.has_shift and ctx.needs_input_grad[2]]
        grad_z, grad_gamma, grad_shift = torch.ops.aten.native_batch_norm_backward(
            grad_x, z, stat_gamma, None, None, mean, invstd, True, ctx.eps, mask)
        grad_z = grad_z.to(input_dtype) if mask[0] else None
        grad_gamma = grad_gamma.to(gamma.dtype) if mask[1] else None
        grad_shift = grad_shift.to(shift.dtype) if mask[2] else None
        return (grad_z, grad_gamma, grad_shift, grad_residual, None, None, None, None, grad_w,
                *([None] * 5))


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fusable_batchnorm(z: Tensor, norm: nn.Module, channel_dim: int | None,
                      residual: Tensor | None = None) -> bool:
    """Whether :func:`batchnorm_mixture` applies to this input and norm (for built-ins)."""
    if type(norm) not in _BATCH_NORMS or not norm.training or channel_dim not in (None, 1):
        return False
    assert isinstance(norm, nn.modules.batchnorm._BatchNorm)
    return (z.dim() >= 2
            # One value per channel, or the wrong number of dimensions: leave it to
            # nn.BatchNorm, whose error messages are clear.
            and z.numel() > z.shape[1] and _valid_input(norm, z)
            # A residual of another dtype would promote the sum; the modules do that.
            and (residual is None or residual.dtype == z.dtype)
            # Hooks on the norm expect to run (and see its output).
            and not (norm._forward_hooks or norm._forward_pre_hooks)
            # The cumulative average's factor changes every step: compiled code would
            # recompile each time.
            and not (norm.momentum is None and torch.compiler.is_compiling()))


def _valid_input(norm: nn.modules.batchnorm._BatchNorm, z: Tensor) -> bool:
    try:
        norm._check_input_dim(z)
    except ValueError:
        return False
    return True


def batchnorm_mixture(
    z: Tensor,
    norm: nn.Module,
    residual: Tensor | None,
    weights: Tensor,
    rows: tuple[tuple[float, ...], ...],
    channel_dim: int | None = None,
    want_norms: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``mixture(norm(z) + residual)`` for a batch norm in training, without keeping its output.

    Updates ``norm``'s running statistics as ``norm(z)`` would. Call it only where
    :func:`fusable_batchnorm` is true and :func:`basis_rows` gives ``rows``; elsewhere apply the
    modules one after the other (:meth:`flexact.FlexAct.forward_batchnorm` does both).

    Args:
        z: Input of the batch norm, channels in dimension 1.
        norm: An ``nn.BatchNorm1d/2d/3d`` in training mode (exactly those classes).
        residual: Added after the batch norm (a residual connection), or ``None``.
        weights: Mixture weights, ``(p,)`` or ``(C, p)`` for channels along dimension 1.
        rows: ``basis_rows`` of the candidates.
        channel_dim: 1 for per-channel weights, ``None`` for one weight vector.
        want_norms: Also return the candidates' batch-mean gradient norms ḡ.

    Returns:
        ``(output, ḡ or None)``.
    """
    assert isinstance(norm, nn.modules.batchnorm._BatchNorm)
    coefficients, squares, used = _constants(rows, z.device, _accumulation_dtype(weights))
    # Running statistics exactly as nn.BatchNorm's forward updates them.
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(norm.num_batches_tracked)
    tracked = norm.track_running_stats  # buffers may exist with tracking switched off
    out, norms = _BatchNormMixture.apply(
        z, norm.weight, norm.bias, residual, norm.running_mean if tracked else None,
        norm.running_var if tracked else None, momentum, norm.eps, weights, coefficients,
        squares, used, channel_dim, want_norms)
    return out, (norms if want_norms else None)
