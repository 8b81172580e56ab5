"""What ``flexact probe`` writes: probe.json, probe.csv and probe.png."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from flexact.nn.registry import get_activation

__all__ = ["Row", "rank_rows", "write_csv", "write_json", "write_png"]


@dataclass
class Row:
    """One probed candidate in the ranking."""

    candidate: str
    canonical: str
    predicted: float
    measured: float | None = None
    rank: int = 0
    score: float = 0.0
    weight: float = 1.0


def rank_rows(rows: list[Row], higher_is_better: bool) -> list[Row]:
    """Sort by the measured metric where known, else the predicted one; set rank and weight.

    ``score`` is that metric standardized over the rows, signed so that higher is better and
    clipped to ±3; ``weight`` = exp(score) is what ``prior: probe.json`` uses.
    """
    sign = 1.0 if higher_is_better else -1.0
    values = np.array([sign * (r.measured if r.measured is not None else r.predicted)
                       for r in rows], dtype=np.float64)
    spread = values.std() if len(values) > 1 and values.std() > 0 else 1.0
    for row, value in zip(rows, values, strict=True):
        row.score = float(np.clip((value - values.mean()) / spread, -3, 3))
        row.weight = math.exp(row.score)
    rows.sort(key=lambda r: -r.score)  # stable: ties keep the order given
    for i, row in enumerate(rows, 1):
        row.rank = i
    return rows


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, rows: Sequence[Row], header: dict[str, object]) -> None:
    """The ranking and how it was made (task key, metric, source of the predictions)."""
    _atomic_write(path, json.dumps({**header, "candidates": [asdict(r) for r in rows]},
                                   indent=2))


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    """The ranking as a table (one row per candidate)."""
    fields = list(asdict(rows[0])) if rows else list(Row.__dataclass_fields__)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    os.replace(tmp, path)


def write_png(path: Path, rows: Sequence[Row], spectra: dict[str, np.ndarray], low: float,
              high: float, show: int = 3) -> None:
    """Shapes and Fisher spectra of the top and bottom ``show`` candidates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = list(rows[:show]) + [r for r in rows[-show:] if r not in rows[:show]]
    fig, (shape_ax, spec_ax) = plt.subplots(1, 2, figsize=(11, 4))
    x = torch.linspace(-4, 4, 401)
    for i, row in enumerate(picked):
        style = "-" if i < show else "--"
        label = f"#{row.rank} {row.candidate}"
        with torch.no_grad():
            y = get_activation(row.candidate)(x).clamp(-10, 10)
        shape_ax.plot(x.numpy(), y.numpy(), style, label=label)
        hist = spectra[row.canonical]
        centres = np.linspace(low, high, hist.shape[-1] + 1)
        centres = (centres[:-1] + centres[1:]) / 2
        spec_ax.plot(centres, hist.mean(0), style, label=label)
    shape_ax.set(title="activation (top: solid, bottom: dashed)", xlabel="x", ylim=(-4, 4))
    spec_ax.set(title="Fisher spectrum at initialization (mean over layers)",
                xlabel="log10 eigenvalue", ylabel="share of eigenvalues")
    shape_ax.legend(fontsize=7)
    spec_ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
