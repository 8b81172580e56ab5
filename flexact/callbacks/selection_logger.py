"""``SelectionLogger``: selection probabilities, entropy and picks through any logger."""

from __future__ import annotations

import json
import os
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from flexact.layers import flexact_layers
from flexact.plot import heatmap_image, plot_history, write_history

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
    ``selection/<layer>/pick`` (the picked candidate's index), identical on every rank. At the
    end of fit it prints a table of the final picks and writes, into the run's log directory,
    ``selection.json`` (final picks), ``selection_history.csv`` (step, epoch, layer, candidate,
    probability, τ) and one PNG per layer of probability against epoch.

    With a ``TensorBoardLogger`` it also builds a dashboard: a "Custom Scalars" layout with one
    multi-line chart per layer (all its candidates), charts of τ and of the entropies, a
    layer × candidate heatmap image every epoch (for per-channel layers: the share of channels
    that picked each candidate, and histograms of their probabilities), and the final picks as
    text. Only rank 0 writes files and images.

    Args:
        every_n_steps: Log every this many optimizer steps (and at every epoch end).
        log_entropy: Also log the selection entropy of each layer.
        filename: Name of the JSON file with the final picks, written in the log directory.
        history_filename: Name of the CSV file with the selection history.
        plots: Write a PNG plot per layer at the end of fit (needs matplotlib).
        heatmap: Add a layer × candidate heatmap image to TensorBoard every epoch.
    """

    def __init__(
        self,
        every_n_steps: PositiveInt = 50,
        log_entropy: bool = True,
        filename: str = "selection.json",
        history_filename: str = "selection_history.csv",
        plots: bool = True,
        heatmap: bool = True,
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.log_entropy = log_entropy
        self.filename = filename
        self.history_filename = history_filename
        self.plots = plots
        self.heatmap = heatmap
        self.summary: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, object]] = []
        self.output_path: str | None = None
        self.plot_paths: list[str] = []

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _tensorboard(trainer: L.Trainer) -> Any | None:
        """The SummaryWriter of the first TensorBoardLogger on rank 0, else ``None``."""
        if not trainer.is_global_zero:
            return None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    @staticmethod
    def _log_dir(trainer: L.Trainer) -> str:
        """The run's log directory; a collective under DDP, so call it on every rank."""
        return trainer.log_dir or trainer.default_root_dir

    @staticmethod
    def _epoch(trainer: L.Trainer) -> float:
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:
            return float(trainer.current_epoch)
        steps_per_epoch = max(batches // max(trainer.accumulate_grad_batches, 1), 1)
        return round(trainer.global_step / steps_per_epoch, 4)

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.summary = selection_summary(pl_module)
        if not self.summary:
            return
        if self.history and self.history[-1]["step"] == trainer.global_step:
            return  # already recorded at this step (epoch end right after a step log)
        epoch = self._epoch(trainer)
        for layer, entry in self.summary.items():
            for cand, prob in zip(entry["candidates"], entry["probabilities"], strict=True):
                self.history.append({"step": trainer.global_step, "epoch": epoch,
                                     "layer": layer, "candidate": cand, "probability": prob,
                                     "tau": entry["tau"]})
        metrics = _metrics(self.summary, self.log_entropy)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = self._tensorboard(trainer)
        layers = list(flexact_layers(pl_module))
        if writer is None or not layers:
            return
        per_layer = {
            _layer_key(name): ["Multiline",
                               [f"selection/{_layer_key(name)}/{c}" for c in layer.candidate_names]]
            for name, layer in layers
        }
        overview = {"temperature τ": ["Multiline", ["tau"]]}
        if self.log_entropy:
            overview["entropy"] = ["Multiline", [f"selection/{_layer_key(name)}/entropy"
                                                 for name, _ in layers]]
        writer.add_custom_scalars({"FlexAct selection": per_layer, "FlexAct training": overview})

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)  # the starting point of every curve

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)
        writer = self._tensorboard(trainer)
        if writer is not None and self.heatmap and self.summary:
            self._add_images(writer, trainer.global_step, pl_module)
        log_dir = self._log_dir(trainer)  # on every rank: trainer.log_dir is a collective
        if trainer.is_global_zero and self.history:
            write_history(os.path.join(log_dir, self.history_filename), self.history)

    def _add_images(self, writer: Any, step: int, pl_module: L.LightningModule) -> None:
        candidates: list[str] = []
        for entry in self.summary.values():
            candidates += [c for c in entry["candidates"] if c not in candidates]
        rows = []
        for entry in self.summary.values():
            counts = entry.get("pick_counts")
            if counts:  # per-channel: the share of channels that picked each candidate
                total = sum(counts.values())
                values = {c: n / total for c, n in counts.items()}
            else:
                values = dict(zip(entry["candidates"], entry["probabilities"], strict=True))
            rows.append([values.get(c, float("nan")) for c in candidates])
        image = heatmap_image(rows, list(self.summary), candidates,
                              title=f"selection at step {step}")
        writer.add_image("selection/heatmap", image, step, dataformats="HWC")
        for name, layer in flexact_layers(pl_module):
            if layer.granularity != "channel":
                continue
            probs = layer.probabilities()
            for j, cand in enumerate(layer.candidate_names):
                writer.add_histogram(f"selection/{_layer_key(name)}/{cand}/channels",
                                     probs[:, j], step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.summary = selection_summary(pl_module)
        log_dir = self._log_dir(trainer)  # on every rank: trainer.log_dir is a collective
        if trainer.is_global_zero:
            self._write(trainer, log_dir)

    def _write(self, trainer: L.Trainer, log_dir: str) -> None:
        rank_zero_info("FlexAct selection:\n" + format_table(self.summary))
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, self.filename)
        tmp = path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(self.summary, handle, indent=2, allow_nan=False)
        os.replace(tmp, path)  # never leave a half-written file behind
        self.output_path = path
        if self.history:
            history_path = write_history(os.path.join(log_dir, self.history_filename),
                                         self.history)
            if self.plots:
                self.plot_paths = [str(p) for p in plot_history(history_path, log_dir)]
        writer = self._tensorboard(trainer)
        if writer is not None and self.summary:
            writer.add_text("selection/final", _markdown_table(self.summary),
                            trainer.global_step)
            writer.flush()


def _markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["| layer | pick | probabilities |", "|---|---|---|"]
    for layer, entry in summary.items():
        probs = ", ".join(f"{c} {p:.3f}" for c, p in
                          zip(entry["candidates"], entry["probabilities"], strict=True))
        lines.append(f"| {layer} | **{entry['pick']}** | {probs} |")
    return "\n".join(lines)
