"""Selection gradients that compare candidates on equal footing (``selection_gradient``).

The gradient a mixture ``y = Σⱼ wⱼ fⱼ(x)`` sends to the weight of candidate ``j`` is
``⟨∂L/∂y, fⱼ(x)⟩``: it grows with the size of ``fⱼ``'s output and carries its offset, so a
candidate with large outputs (Identity, ReLU) wins the selection for its scale rather than its
shape, the bias docs/method.md §2 describes. With ``selection_gradient="standardized"`` the
weights receive ``⟨∂L/∂y, (fⱼ(x) − μⱼ)/σⱼ⟩`` instead, with ``μⱼ, σⱼ`` the batch mean and standard
deviation of ``fⱼ(x)`` (per channel for per-channel selections). Only the logits' gradient
changes: the forward value and every other gradient are those of the plain mixture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["standardize_selection_gradient"]


def standardize_selection_gradient(out: Tensor, x: Tensor, weights: Tensor,
                                   candidates: Sequence[nn.Module],
                                   channel_dim: int | None) -> Tensor:
    """``out`` with the weights' gradient taken against standardized candidate outputs.

    Adds ``Σⱼ (wⱼ − stop(wⱼ)) · stop(zⱼ − fⱼ)`` to ``out``, zero in value, where ``zⱼ`` is
    ``fⱼ(x)`` standardized over the batch: ``∂/∂wⱼ`` becomes ``zⱼ`` in place of ``fⱼ``.

    Args:
        out: The mixture's output (any path: closed form or general).
        x: The layer input.
        weights: The mixture weights, ``(k,)`` or ``(C, k)`` (differentiable).
        candidates: The live candidate modules, in the order of ``weights``' last dimension.
        channel_dim: The channel dimension of ``x`` for per-channel weights, else ``None``.

    Returns:
        A tensor equal to ``out`` whose gradient to ``weights`` uses standardized outputs.
    """
    dims = [d for d in range(x.dim()) if d != channel_dim]
    with torch.no_grad():
        corrections = []
        for candidate in candidates:
            f = candidate(x).float()
            mean = f.mean(dim=dims, keepdim=True)
            std = f.std(dim=dims, keepdim=True).clamp_min(1e-6)
            corrections.append(((f - mean) / std - f).to(out.dtype))
        stacked = torch.stack(corrections, dim=-1)  # x's shape + (k,)
    delta = (weights - weights.detach()).to(out.dtype)
    if channel_dim is not None:  # (C, k) → broadcast along x's channel dimension
        shape = [1] * x.dim() + [weights.shape[-1]]
        shape[channel_dim] = weights.shape[0]
        delta = delta.reshape(shape)
    return out + (stacked * delta).sum(dim=-1)
