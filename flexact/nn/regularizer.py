"""The bias-correcting regularizer (docs/method.md eq. 4): ``KL(p̃ ‖ p)`` over a model's layers."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from flexact.nn.layer import FlexAct, flexact_layers

__all__ = ["selection_kl"]


def selection_kl(model: nn.Module, reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """``KL(p̃ ‖ p)`` over every FlexAct layer of ``model`` (docs/method.md eq. 4).

    Multiply by α and add to the task loss. Zero (a tensor) if the model has no FlexAct layer.

    Args:
        model: Any module containing FlexAct layers.
        reduction: ``"sum"`` over layers, as the paper's eq. (4), or ``"mean"`` over layers, so
            that α's pull does not grow with the number of FlexAct layers (see the teacher
            benchmark in benchmarks/RESULTS.md).
    """
    layers = [layer for _, layer in flexact_layers(model)]
    if not layers:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    terms: list[Tensor] = []
    # Layers whose logits have the same shape: one batched KL for all of them (a dozen small
    # kernels in all, instead of a dozen per layer). Subclasses that define their own
    # kl_divergence are asked one by one.
    batches: dict[tuple[tuple[int, ...], torch.dtype, torch.device],
                  list[tuple[FlexAct, Tensor]]] = {}
    for layer in layers:
        if type(layer).kl_divergence is not FlexAct.kl_divergence:
            terms.append(layer.kl_divergence())
        elif layer._targets is not None and not layer.committed:  # else its KL is zero
            logits = layer.selection_logits()  # the live candidates' (pruned ones left out)
            key = (tuple(logits.shape), logits.dtype, logits.device)
            batches.setdefault(key, []).append((layer, logits))
    for batch in batches.values():
        target = torch.stack([layer._targets for layer, _ in batch])  # type: ignore[misc]
        log_p = torch.log_softmax(torch.stack([logits for _, logits in batch]), dim=-1)
        kl = (torch.special.xlogy(target, target) - target * log_p).sum(dim=-1)
        terms.append((kl.mean(dim=-1) if kl.dim() > 1 else kl).sum())  # channels: the mean
    count = len(layers)
    if not terms:
        return layers[0].logits.new_zeros(())
    total = terms[0]
    for term in terms[1:]:  # (a Python sum: the terms may differ in dtype)
        total = total + term
    return total / count if reduction == "mean" else total
