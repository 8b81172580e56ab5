"""The current selection of a model's FlexAct layers, read with one device transfer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flexact import FlexAct, flexact_layers

__all__ = ["Summary", "named_layers", "selection_metrics", "selection_summary"]

Summary = dict[str, dict[str, Any]]
"""``{layer: {"candidates", "probabilities", "pick", "entropy", "tau"[, "pick_counts"]}}``."""


def named_layers(model: nn.Module) -> list[tuple[str, FlexAct]]:
    """``(key, layer)`` for every FlexAct layer, keyed as in metric names and files.

    Names are relative to the network: a LightningModule's ``model`` attribute when it holds
    every FlexAct layer (so keys read ``head.flexact``, not ``model.head.flexact``); an unnamed
    root layer is ``flexact``.
    """
    layers = list(flexact_layers(model))
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and layers:
        inner_layers = list(flexact_layers(inner))
        if len(inner_layers) == len(layers):
            layers = inner_layers
    return [(name or "flexact", layer) for name, layer in layers]


def _layer_values(probs: torch.Tensor) -> torch.Tensor:
    """Mean probabilities, mean entropy and per-candidate pick counts of one layer, flat."""
    rows = probs.reshape(-1, probs.shape[-1])
    entropy = -(rows * rows.clamp_min(1e-12).log()).sum(-1).mean()
    # one_hot + sum rather than bincount, which has no deterministic CUDA kernel
    counts = torch.nn.functional.one_hot(rows.argmax(-1), rows.shape[-1]).sum(0)
    return torch.cat([rows.mean(0), entropy.reshape(1), counts.to(rows.dtype)])


def selection_summary(model: nn.Module) -> Summary:
    """Current selection of every FlexAct layer of ``model``.

    τ is read once (from the first layer: TemperatureAnnealing gives every layer the same τ)
    and all layers' values come to the host in one transfer, so a summary costs two device
    synchronizations however many layers the model has.

    Args:
        model: Any module containing FlexAct layers.

    Returns:
        ``{layer: {"candidates", "probabilities", "pick", "entropy", "tau"}}``; for per-channel
        layers ``probabilities`` is the channel mean, ``pick`` the most common per-channel pick
        and ``pick_counts`` counts channels per candidate. Empty without FlexAct layers.
    """
    layers = named_layers(model)
    if not layers:
        return {}
    tau = layers[0][1].tau
    values = torch.cat([_layer_values(layer.probabilities()) for _, layer in layers]).tolist()
    summary: Summary = {}
    offset = 0
    for name, layer in layers:
        candidates = list(layer.candidate_names)
        n = len(candidates)
        probabilities = values[offset:offset + n]
        counts = {c: int(k) for c, k in zip(candidates, values[offset + n + 1:offset + 2 * n + 1],
                                            strict=True)}
        entry: dict[str, Any] = {
            "candidates": candidates,
            "probabilities": [round(p, 6) for p in probabilities],
            "pick": max(counts, key=lambda c: counts[c]),
            "entropy": values[offset + n],
            "tau": tau,
        }
        if layer.granularity == "channel":
            entry["pick_counts"] = counts
        summary[name] = entry
        offset += 2 * n + 1
    return summary


def selection_metrics(summary: Summary, log_entropy: bool = True) -> dict[str, float]:
    """The logged scalars of a summary.

    Args:
        summary: As returned by :func:`selection_summary`.
        log_entropy: Include ``selection/<layer>/entropy``.

    Returns:
        ``selection/<layer>/<candidate>`` probabilities, ``selection/<layer>/pick`` (the picked
        candidate's index) and, with ``log_entropy``, ``selection/<layer>/entropy``.
    """
    metrics: dict[str, float] = {}
    for layer, entry in summary.items():
        for cand, prob in zip(entry["candidates"], entry["probabilities"], strict=True):
            metrics[f"selection/{layer}/{cand}"] = prob
        metrics[f"selection/{layer}/pick"] = float(entry["candidates"].index(entry["pick"]))
        if log_entropy:
            metrics[f"selection/{layer}/entropy"] = entry["entropy"]
    return metrics
