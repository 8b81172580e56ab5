"""Tensor helpers of the closed-form kernels: dtypes, broadcasting, one-pass reductions."""

from __future__ import annotations

import torch
from torch import Tensor

from flexact.nn.basis import _SIG, _SIG2


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


