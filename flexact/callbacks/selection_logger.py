"""``SelectionLogger``: selection probabilities, entropy and picks through any logger."""

from __future__ import annotations

import json
import os
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from flexact.layers import flexact_layers

__all__ = ["SelectionLogger", "selection_summary"]


def _layer_key(name: str) -> str:
    return name or "flexact"


def selection_summary(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Current selection of every FlexAct layer of ``model``.

    Returns:
        ``{layer: {"candidates", "probabilities", "pick", "entropy", "tau"}}``; for per-channel
        layers ``probabilities`` is the channel mean, ``pick`` the most common per-channel pick
        and ``pick_counts`` counts channels per candidate.
    """
    summary: dict[str, dict[str, Any]] = {}
    for name, layer in flexact_layers(model):
        probs = layer.probabilities()
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        mean_probs = probs.reshape(-1, probs.shape[-1]).mean(0)
        picks = layer.selected()
        counts = {c: picks.count(c) for c in layer.candidate_names}
        entry: dict[str, Any] = {
            "candidates": list(layer.candidate_names),
            "probabilities": [round(float(p), 6) for p in mean_probs],
            "pick": max(counts, key=lambda c: counts[c]),
            "entropy": float(entropy),
            "tau": layer.tau,
        }
        if layer.granularity == "channel":
            entry["pick_counts"] = counts
        summary[_layer_key(name)] = entry
    return summary


def _metrics(summary: dict[str, dict[str, Any]], log_entropy: bool) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for layer, entry in summary.items():
        for cand, prob in zip(entry["candidates"], entry["probabilities"], strict=True):
            metrics[f"selection/{layer}/{cand}"] = prob
        metrics[f"selection/{layer}/pick"] = float(entry["candidates"].index(entry["pick"]))
        if log_entropy:
            metrics[f"selection/{layer}/entropy"] = entry["entropy"]
    return metrics


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of each layer's pick and probabilities."""
    if not summary:
        return "no FlexAct layer in the model"
    candidates = sorted({c for e in summary.values() for c in e["candidates"]},
                        key=lambda c: next(e["candidates"].index(c) for e in summary.values()
                                           if c in e["candidates"]))
    width = max(len("layer"), *(len(k) for k in summary))
    header = f"{'layer':<{width}}  {'pick':<12}" + "".join(f"{c:>12}" for c in candidates)
    lines = [header, "-" * len(header)]
    for layer, entry in summary.items():
        probs = dict(zip(entry["candidates"], entry["probabilities"], strict=True))
        cells = "".join(f"{probs[c]:>12.4f}" if c in probs else f"{'-':>12}" for c in candidates)
        lines.append(f"{layer:<{width}}  {entry['pick']:<12}{cells}")
    return "\n".join(lines)


class SelectionLogger(Callback):
    """Log each FlexAct layer's selection probabilities, entropy and pick through any logger.

    Keys are ``selection/<layer>/<candidate>``, ``selection/<layer>/entropy`` and
    ``selection/<layer>/pick`` (the picked candidate's index). At the end of fit it prints a
    table of the final picks and writes them as JSON into the run's log directory.

    Args:
        every_n_steps: Log every this many optimizer steps (and at every epoch end).
        log_entropy: Also log the selection entropy of each layer.
        filename: Name of the JSON file with the final picks, written in the log directory.
    """

    def __init__(
        self,
        every_n_steps: PositiveInt = 50,
        log_entropy: bool = True,
        filename: str = "selection.json",
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.log_entropy = log_entropy
        self.filename = filename
        self.summary: dict[str, dict[str, Any]] = {}
        self.output_path: str | None = None

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.loggers:
            return
        self.summary = selection_summary(pl_module)
        metrics = _metrics(self.summary, self.log_entropy)
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.summary = selection_summary(pl_module)
        self._write(trainer)

    @rank_zero_only
    def _write(self, trainer: L.Trainer) -> None:
        rank_zero_info("FlexAct selection:\n" + format_table(self.summary))
        log_dir = trainer.log_dir or trainer.default_root_dir
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, self.filename)
        tmp = path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(self.summary, handle, indent=2, allow_nan=False)
        os.replace(tmp, path)  # never leave a half-written file behind
        self.output_path = path
