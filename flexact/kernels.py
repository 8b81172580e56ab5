"""Closed-form mixtures of the built-in candidates: each basis function evaluated once.

ReLU, LeakyReLU, Identity, Sigmoid and Tanh are all linear combinations of five basis
functions, ``relu(x)``, ``x``, ``σ(x)``, ``σ(2x)`` and ``1`` (``tanh(x) = 2σ(2x) − 1``,
``leaky_relu(x) = (1 − s)·relu(x) + s·x``). A mixture ``Σⱼ wⱼ fⱼ(x)`` of such candidates is
therefore ``Σₖ βₖ bₖ(x)`` with ``β = w·C`` for a fixed coefficient matrix ``C``: every basis
function is evaluated once, however many candidates share it, and the forward is a handful of
element-wise passes. Tanh also goes through the sigmoid kernel, several times faster than
``torch.tanh`` on CPUs. The backward needs only ``x``; the weight gradients are four inner
products. The regularizer's gradient norms (METHOD.md eq. 1) come out of the same forward from
the ``σ`` values it has already computed, instead of differentiating every candidate again.

After a batch norm, :func:`batchnorm_mixture` (behind :meth:`flexact.FlexAct.forward_batchnorm`)
also folds the batch norm and a residual addition into the same autograd step, so that the
layer's input is recomputed in backward instead of stored.

Pure PyTorch; :func:`flexact.layers.mixture` and :class:`flexact.layers.FlexAct` take this path
whenever every candidate is one of the five built-ins, and the general one otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "BASIS",
    "basis_row",
    "basis_rows",
    "batchnorm_mixture",
    "closed_form_mixture",
    "fusable_batchnorm",
]

BASIS: tuple[str, ...] = ("relu", "x", "sigmoid", "sigmoid_2x", "one")
"""The basis functions, in the column order of the coefficient matrix."""

_RELU, _X, _SIG, _SIG2, _ONE = range(len(BASIS))

# (device, dtype, rows) -> (coefficients C (p, 5), squared-norm coefficients Q (4, p), used
# bases), so that a training step never copies these small constants from the host again.
_CONSTANTS: dict[tuple[torch.device, torch.dtype, tuple[tuple[float, ...], ...]],
                 tuple[Tensor, Tensor, tuple[bool, ...]]] = {}


def basis_row(module: nn.Module) -> tuple[float, float, float, float, float] | None:
    """The candidate's coefficients over :data:`BASIS`, or ``None`` if it has no closed form.

    Only the exact built-in classes qualify (a subclass may override ``forward``).
    """
    kind = type(module)
    if kind is nn.ReLU:
        return (1.0, 0.0, 0.0, 0.0, 0.0)
    if kind is nn.LeakyReLU:
        slope = float(module.negative_slope)
        return (1.0 - slope, slope, 0.0, 0.0, 0.0)
    if kind is nn.Identity:
        return (0.0, 1.0, 0.0, 0.0, 0.0)
    if kind is nn.Sigmoid:
        return (0.0, 0.0, 1.0, 0.0, 0.0)
    if kind is nn.Tanh:
        return (0.0, 0.0, 0.0, 2.0, -1.0)
    return None


def basis_rows(candidates: Sequence[nn.Module]) -> tuple[tuple[float, ...], ...] | None:
    """Coefficient rows of all candidates, or ``None`` if any lacks a closed form."""
    rows = []
    for act in candidates:
        row = basis_row(act)
        if row is None:
            return None
        rows.append(row)
    return tuple(rows)


def _constants(rows: tuple[tuple[float, ...], ...], device: torch.device,
               dtype: torch.dtype) -> tuple[Tensor, Tensor, tuple[bool, ...]]:
    """``(C, Q, used)`` for these candidate rows.

    ``C`` and ``Q`` on ``device`` in ``dtype`` (float32 or float64); ``used[k]``: whether any
    candidate needs basis ``k``.
    """
    key = (device, dtype, rows)
    if key not in _CONSTANTS:
        # Never inference tensors: a first call under torch.inference_mode (a sanity-check
        # validation) must not leave constants that training cannot save for backward.
        with torch.inference_mode(False):
            coefficients, squares = _build_constants(rows)
            used = tuple(any(row[k] != 0.0 for row in rows) for k in range(len(BASIS)))
            _CONSTANTS[key] = (coefficients.to(device, dtype), squares.to(device, dtype), used)
    return _CONSTANTS[key]


def _build_constants(rows: tuple[tuple[float, ...], ...]) -> tuple[Tensor, Tensor]:
    # In float64, so that float64 models get the exact slopes (LeakyReLU's 0.01).
    coefficients = torch.tensor(rows, dtype=torch.float64)
    # A candidate's squared gradient norm over a group of n elements is
    # (c_relu + c_x)²·#(x > 0) + c_x²·#(x ≤ 0) + c_σ²·Σσ'(x)² + (2c_σ2x)²·Σσ'(2x)²: each
    # built-in row uses one kind of basis (piecewise linear, σ(x) or σ(2x)), so no cross
    # terms arise. Rows: the factors of [#(x > 0), Σσ'(x)², Σσ'(2x)²], then that of n.
    relu, ident, sig, sig2 = (coefficients[:, k] for k in (_RELU, _X, _SIG, _SIG2))
    squares = torch.stack([(relu + ident) ** 2 - ident**2, sig**2, (2 * sig2) ** 2,
                           ident**2])
    return coefficients, squares


def _column(beta: Tensor, k: int, x: Tensor, channel_dim: int | None) -> Tensor:
    """Basis coefficient ``k``, shaped to broadcast against ``x``, in ``x``'s dtype."""
    column = beta[..., k].to(x.dtype)
    if channel_dim is None:
        return column
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return column.reshape(shape)


def _accumulation_dtype(t: Tensor) -> torch.dtype:
    """float32, or float64 for float64 tensors: reductions never run in half precision."""
    return torch.promote_types(t.dtype, torch.float32)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """Where to evaluate the mixture: float32 for half-precision tensors on the CPU.

    CPU kernels for bf16/fp16 are slower than float32 ones and their float32 reductions copy
    the whole input first, so one conversion in and one out is cheaper than a dozen. GPUs keep
    the input dtype (their reductions accumulate in float32 on the fly).
    """
    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return t.dtype


def _mix(weights: Tensor, coefficients: Tensor) -> Tensor:
    # An element-wise product and sum rather than a matmul, so autocast leaves it in float32.
    dtype = _accumulation_dtype(weights)
    return (weights.to(dtype).unsqueeze(-1) * coefficients.to(dtype)).sum(-2)


def _group_dims(x: Tensor, channel_dim: int | None) -> tuple[int, ...]:
    """The dimensions a gradient norm runs over: all but the batch (and channel) dimension."""
    return tuple(d for d in range(1, x.dim()) if d != channel_dim)


def _sum_over(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    # ``sum(dim=())`` would reduce everything; an empty group is the element itself (copied:
    # ``t`` may be a scratch buffer that is overwritten next).
    dtype = _accumulation_dtype(t)
    return t.sum(dim=dims, dtype=dtype) if dims else t.to(dtype, copy=True)


def _flat(t: Tensor) -> Tensor | None:
    """A 1-D view of ``t`` in memory order, or ``None`` if it is neither layout below."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return None


def _inner(a: Tensor, b: Tensor, channel_dim: int | None) -> Tensor:
    """``Σ a·b`` (at least float32), per channel when ``channel_dim`` is set."""
    dtype = _accumulation_dtype(a)
    if channel_dim is None:
        if a.dtype == b.dtype == dtype and a.stride() == b.stride():
            fa, fb = _flat(a), _flat(b)
            if fa is not None and fb is not None:
                return torch.dot(fa, fb)  # one pass, nothing allocated
        return torch.mul(a, b).sum(dtype=dtype)
    if (channel_dim == 1 and a.dim() > 2 and a.dtype == b.dtype == dtype
            and a.is_contiguous() and b.is_contiguous()):
        # (N, C, rest): products summed along the contiguous last dimension first, then N.
        n, c = a.shape[:2]
        return torch.linalg.vecdot(a.view(n, c, -1), b.view(n, c, -1)).sum(0)
    dims = tuple(d for d in range(a.dim()) if d != channel_dim)
    return torch.mul(a, b).sum(dim=dims, dtype=dtype)


def _sigmoid_into(buf: Tensor, x: Tensor, scale: float) -> Tensor:
    """``σ(scale·x)`` written into ``buf`` (no new tensor)."""
    if scale == 1.0:
        return torch.sigmoid(x, out=buf)
    return torch.mul(x, scale, out=buf).sigmoid_()


def _sum_sq(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``Σ t²`` over ``dims`` in float32 (one pass, nothing allocated)."""
    if not dims:
        return t.to(_accumulation_dtype(t)).square()
    return torch.linalg.vector_norm(t, 2, dim=dims, dtype=_accumulation_dtype(t)).square()


# The smooth bases: (column, scale a) for σ(a·x).
_SMOOTH = ((_SIG, 1.0), (_SIG2, 2.0))


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

    Returns:
        ``(output, ḡ or None)``, or ``None`` when the general path must be taken.
    """
    rows = basis_rows(candidates)
    if rows is None:
        return None
    want_norms = want_norms and x.dim() >= 2  # ḡ needs a batch dimension
    coefficients, squares, used = _constants(rows, x.device, _accumulation_dtype(weights))
    out, norms = _ClosedFormMixture.apply(
        x, weights, coefficients, squares, used, channel_dim, save_dtype, want_norms
    )
    return out, (norms if want_norms else None)


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
