"""Reports of the selection: TensorBoard dashboard pieces, tables and the JSON file.

Each output is one function of a :data:`~flexact.callbacks.selection_summary.Summary` (or of the
model, for per-channel histograms); :class:`~flexact.callbacks.SelectionLogger` calls them.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from flexact.callbacks.selection_summary import Summary, named_layers
from flexact.tools.plot import heatmap_image

__all__ = [
    "add_channel_histograms",
    "add_final_text",
    "add_heatmap",
    "add_layout",
    "format_table",
    "markdown_table",
    "tensorboard_writer",
    "write_summary_json",
]


def tensorboard_writer(trainer: Trainer) -> Any | None:
    """The SummaryWriter of the trainer's first TensorBoardLogger on rank 0, else ``None``."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _exactly(tag: str) -> str:
    """A custom-scalars tag pattern (a regex TensorBoard matches at the start) for ``tag`` only."""
    return re.escape(tag) + "$"


def add_layout(writer: Any, model: torch.nn.Module, log_entropy: bool) -> None:
    """TensorBoard "Custom Scalars": per FlexAct layer a chart per candidate, and a chart of τ.

    A chart draws each of its tags once per run, in the run's colour, so each chart holds one
    tag: comparing runs, every line of a chart is a run (one chart with all of a layer's
    candidates would draw them in one colour per run). Each layer is a category,
    ``FlexAct selection: <layer>``, with one chart per candidate (its probability) and, with
    ``log_entropy``, one of the layer's selection entropy; ``FlexAct training`` holds τ.
    """
    layers = named_layers(model)
    if not layers:
        return
    layout: dict[str, dict[str, list[Any]]] = {}
    for key, layer in layers:
        charts = {cand: ["Multiline", [_exactly(f"selection/{key}/{cand}")]]
                  for cand in layer.candidate_names}
        if log_entropy:
            charts["selection entropy"] = ["Multiline", [_exactly(f"selection/{key}/entropy")]]
        layout[f"FlexAct selection: {key}"] = charts
    layout["FlexAct training"] = {"temperature τ": ["Multiline", [_exactly("tau")]]}
    writer.add_custom_scalars(layout)


def _all_candidates(summary: Summary) -> list[str]:
    """Every layer's candidates, in first-seen order."""
    candidates: list[str] = []
    for entry in summary.values():
        candidates += [c for c in entry["candidates"] if c not in candidates]
    return candidates


def _heatmap_rows(summary: Summary) -> tuple[list[list[float]], list[str]]:
    """The heatmap's rows (one per layer) and columns (every candidate).

    A row holds the layer's probabilities, or for a per-channel layer the share of channels
    that picked each candidate; NaN where a layer lacks a candidate.
    """
    candidates = _all_candidates(summary)
    rows = []
    for entry in summary.values():
        counts = entry.get("pick_counts")
        if counts:
            total = sum(counts.values())
            values = {c: n / total for c, n in counts.items()}
        else:
            values = dict(zip(entry["candidates"], entry["probabilities"], strict=True))
        rows.append([values.get(c, float("nan")) for c in candidates])
    return rows, candidates


def add_heatmap(writer: Any, summary: Summary, step: int) -> None:
    """A layer × candidate heatmap image, ``selection/heatmap``."""
    rows, candidates = _heatmap_rows(summary)
    image = heatmap_image(rows, list(summary), candidates, title=f"selection at step {step}")
    writer.add_image("selection/heatmap", image, step, dataformats="HWC")


def add_channel_histograms(writer: Any, model: torch.nn.Module, step: int) -> None:
    """Per-channel layers: a histogram of each candidate's probability over the channels."""
    for key, layer in named_layers(model):
        if layer.granularity != "channel":
            continue
        probs = layer.probabilities().cpu()
        for j, cand in enumerate(layer.candidate_names):
            writer.add_histogram(f"selection/{key}/{cand}/channels", probs[:, j], step)


def markdown_table(summary: Summary) -> str:
    """A Markdown table of each layer's pick and probabilities."""
    lines = ["| layer | pick | probabilities |", "|---|---|---|"]
    for layer, entry in summary.items():
        probs = ", ".join(f"{c} {p:.3f}" for c, p in
                          zip(entry["candidates"], entry["probabilities"], strict=True))
        lines.append(f"| {layer} | **{entry['pick']}** | {probs} |")
    return "\n".join(lines)


def add_final_text(writer: Any, summary: Summary, step: int) -> None:
    """The final picks as TensorBoard text, ``selection/final``."""
    writer.add_text("selection/final", markdown_table(summary), step)
    writer.flush()


def format_table(summary: Summary) -> str:
    """A plain-text table of each layer's pick and probabilities."""
    if not summary:
        return "no FlexAct layer in the model"
    candidates = _all_candidates(summary)
    width = max(len("layer"), *(len(k) for k in summary))
    header = f"{'layer':<{width}}  {'pick':<12}" + "".join(f"{c:>12}" for c in candidates)
    lines = [header, "-" * len(header)]
    for layer, entry in summary.items():
        probs = dict(zip(entry["candidates"], entry["probabilities"], strict=True))
        cells = "".join(f"{probs[c]:>12.4f}" if c in probs else f"{'-':>12}" for c in candidates)
        lines.append(f"{layer:<{width}}  {entry['pick']:<12}{cells}")
    return "\n".join(lines)


def write_summary_json(path: str, summary: Summary) -> str:
    """Write the summary as JSON atomically (a temporary file renamed into place)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(summary, handle, indent=2, allow_nan=False)
    os.replace(tmp, path)  # never leave a half-written file behind
    return path
