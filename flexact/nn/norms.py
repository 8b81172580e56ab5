"""What the regularizer measures (docs/method.md eqs. 1–2): the candidates' gradient norms ḡ.

``gradient_norms`` is the batch mean of ‖∇ₓ σⱼ(h)‖ for every candidate; ``all_ranks_mean``
averages it over the ranks of torch.distributed, so N devices measure the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flexact.nn.registry import activation_derivative

__all__ = ["all_ranks_mean", "gradient_norms"]


@torch.no_grad()
def gradient_norms(
    candidates: Sequence[nn.Module],
    x: Tensor,
    input_weight: Tensor | None = None,
    channel_dim: int | None = None,
) -> Tensor:
    """Batch-mean gradient norm ḡ of every candidate (docs/method.md eq. 1).

    Args:
        candidates: The candidate activation modules.
        x: Pre-activation ``h`` (first dimension is the batch).
        input_weight: ``W`` of the affine map that produced ``h`` (see :meth:`FlexAct.forward`).
        channel_dim: Channel dimension for per-channel norms, or ``None`` for per-layer.

    Returns:
        ``(p,)`` for a per-layer layer, ``(C, p)`` per channel.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    h = x.detach().to(dtype)
    if h.dim() == 1:
        h = h.unsqueeze(-1)
    w = None if input_weight is None else input_weight.detach().to(dtype)
    norms = []
    derivatives = []
    for act in candidates:
        param = next(act.parameters(), None)
        if param is None or param.dtype == dtype:
            d = activation_derivative(act, h)
        else:  # differentiate a parameterized candidate in its own dtype
            d = activation_derivative(act, h.to(param.dtype)).to(dtype)
        if channel_dim is None and w is not None:
            derivatives.append(d)  # all candidates in one product below
            continue
        if channel_dim is None:
            g = d.flatten(1).norm(dim=1)
        elif w is not None:
            g = d.abs() * w.norm(dim=1)  # channel c depends on x through row c of W
        else:
            g = d.movedim(channel_dim, 1).reshape(d.shape[0], d.shape[channel_dim], -1)
            g = g.norm(dim=2)
        norms.append(g.mean() if channel_dim is None else g.reshape(-1, g.shape[-1]).mean(0))
    if derivatives:  # ∇ₓ Σₒ σ(hₒ) = σ'(h) W per sample, for every candidate at once
        assert w is not None
        with torch.autocast(device_type=h.device.type, enabled=False):  # keep float32
            stacked = torch.stack(derivatives)  # (p, ..., out)
            # One 2-D product: a batched one stalls on a loaded CPU (threads of the bmm wait).
            products = torch.mm(stacked.reshape(-1, stacked.shape[-1]), w)
        return products.norm(dim=-1).reshape(len(derivatives), -1).mean(1)
    return torch.stack(norms, dim=-1)


def all_ranks_mean(g: Tensor, count: int) -> Tensor:
    """Mean of ``g`` over all ranks of torch.distributed, weighted by each rank's ``count``.

    Returns ``g`` unchanged outside a multi-process group. Every rank must call it (it is a
    collective): all ranks run the same training forwards under DDP.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return g
    # One all-reduce of [count·g, count]: equal to the global batch mean also for uneven batches.
    packed = torch.cat([g.flatten() * count, g.new_full((1,), float(count))])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return (packed[:-1] / packed[-1]).reshape(g.shape)
