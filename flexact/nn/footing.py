"""Selection gradients that compare candidates on equal footing (``selection_gradient``).

The gradient a mixture ``y = Σⱼ wⱼ fⱼ(x)`` sends to the weight of candidate ``j`` is
``⟨∂L/∂y, fⱼ(x)⟩``: it grows with the size of ``fⱼ``'s output and carries its offset, so a
candidate with large outputs (Identity, ReLU) wins the selection for its scale rather than its
shape, the bias docs/method.md §2 describes. Standardized, the weights receive
``⟨∂L/∂y, (fⱼ(x) − μⱼ)/σⱼ⟩`` instead, with ``μⱼ, σⱼ`` the batch mean and standard deviation of
``fⱼ(x)`` (per channel for per-channel selections). Only the weights' gradient changes: the
forward value and every other gradient are those of the plain mixture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["standardized_weights"]


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

    Returns:
        ``(weights', offset)``: mix with ``weights'`` in place of ``weights``, then add
        ``offset`` (zero, shaped to broadcast against the output) to the mixture.
    """
    dims = [d for d in range(x.dim()) if d != channel_dim]
    with torch.no_grad():
        moments = [torch.std_mean(candidate(x).float(), dim=dims) for candidate in candidates]
        std = torch.stack([s for s, _ in moments], dim=-1).clamp_min(1e-6).to(weights.dtype)
        mean = torch.stack([m for _, m in moments], dim=-1).to(weights.dtype)
    delta = weights - weights.detach()
    offset = -(delta * (mean / std)).sum(dim=-1)  # () or (C,)
    if channel_dim is not None:  # (C,) → broadcast along x's channel dimension
        shape = [1] * x.dim()
        shape[channel_dim] = weights.shape[0]
        offset = offset.reshape(shape)
    return weights.detach() + delta / std, offset
