"""The bias-correcting regularizer (docs/method.md §2): gradient norms ḡ and ``KL(p̃ ‖ p)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from flexact.nn.registry import activation_derivative

__all__ = ["all_ranks_mean", "gradient_norms", "selection_kl"]


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
            products = torch.matmul(torch.stack(derivatives), w)  # (p, ..., in)
        return products.norm(dim=-1).flatten(1).mean(1)
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


def selection_kl(model: nn.Module, reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """``KL(p̃ ‖ p)`` over every FlexAct layer of ``model`` (docs/method.md eq. 4).

    Multiply by α and add to the task loss. Zero (a tensor) if the model has no FlexAct layer.

    Args:
        model: Any module containing FlexAct layers.
        reduction: ``"sum"`` over layers, as the paper's eq. (4), or ``"mean"`` over layers, so
            that α's pull does not grow with the number of FlexAct layers (see the teacher
            benchmark in benchmarks/RESULTS.md).
    """
    from flexact.nn.layer import FlexAct, flexact_layers  # the layer imports this module

    layers = [layer for _, layer in flexact_layers(model)]
    if not layers:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    terms: list[Tensor] = []
    # Layers whose logits have the same shape: one batched KL for all of them (a dozen small
    # kernels in all, instead of a dozen per layer). Subclasses that define their own
    # kl_divergence are asked one by one.
    batches: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[FlexAct]] = {}
    for layer in layers:
        if type(layer).kl_divergence is not FlexAct.kl_divergence:
            terms.append(layer.kl_divergence())
        elif layer._targets is not None and not layer.committed:  # else its KL is zero
            key = (tuple(layer.logits.shape), layer.logits.dtype, layer.logits.device)
            batches.setdefault(key, []).append(layer)
    for batch in batches.values():
        target = torch.stack([layer._targets for layer in batch])  # type: ignore[misc]
        log_p = torch.log_softmax(torch.stack([layer.logits for layer in batch]), dim=-1)
        kl = (torch.special.xlogy(target, target) - target * log_p).sum(dim=-1)
        terms.append((kl.mean(dim=-1) if kl.dim() > 1 else kl).sum())  # channels: the mean
    count = len(layers)
    if not terms:
        return layers[0].logits.new_zeros(())
    total = terms[0]
    for term in terms[1:]:  # (a Python sum: the terms may differ in dtype)
        total = total + term
    return total / count if reduction == "mean" else total
