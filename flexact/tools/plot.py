"""Plots of how FlexAct layers choose: selection probability against epoch, per layer.

Reads the ``selection_history.csv`` that :class:`~flexact.callbacks.SelectionLogger` writes
during fit (appending the new rows every epoch). Also the ``flexact plot`` command
(``python -m flexact.tools.plot``)::

    flexact plot runs/synthetic/version_0/selection_history.csv
    flexact plot a03/selection_history.csv --compare a0/selection_history.csv --labels a03 a0

Pure PyTorch/matplotlib: no Lightning import. Uses matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flexact.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "HISTORY_FIELDS",
    "History",
    "append_history",
    "heatmap_image",
    "main",
    "plot_history",
    "plot_layer",
    "read_history",
    "write_history",
]

HISTORY_FIELDS = ("step", "epoch", "layer", "candidate", "probability", "tau")
"""Columns of ``selection_history.csv``; ``epoch`` is fractional (steps / steps per epoch)."""


@dataclass
class History:
    """Selection probabilities over training for every layer and candidate.

    Attributes:
        series: ``{layer: {candidate: [(epoch, probability), ...]}}`` in logging order.
        tau: ``[(epoch, τ), ...]`` (τ of the first layer at each logged point).
    """

    series: dict[str, dict[str, list[tuple[float, float]]]]
    tau: list[tuple[float, float]]

    @property
    def layers(self) -> list[str]:
        """Layer names in first-seen order."""
        return list(self.series)


def write_history(path: str | Path, rows: Sequence[dict[str, object]]) -> Path:
    """Write history rows to CSV atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def append_history(path: str | Path, rows: Sequence[dict[str, object]]) -> Path:
    """Append history rows to a CSV that :func:`write_history` started (no header)."""
    path = Path(path)
    with open(path, "a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=HISTORY_FIELDS).writerows(rows)
    return path


def read_history(path: str | Path) -> History:
    """Read a ``selection_history.csv``.

    Raises:
        ConfigError: If the file is missing or lacks the expected columns.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no selection history at {path}: run `flexact fit` with the "
                          "SelectionLogger callback first, or pass the CSV's path")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(HISTORY_FIELDS) - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(f"{path} is not a selection history: missing columns "
                              f"{sorted(missing)}")
        series: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(
            lambda: defaultdict(list))
        tau: dict[float, float] = {}
        for row in reader:
            epoch = float(row["epoch"])
            series[row["layer"]][row["candidate"]].append((epoch, float(row["probability"])))
            if row["tau"] not in ("", None):
                tau.setdefault(epoch, float(row["tau"]))
    return History({k: dict(v) for k, v in series.items()}, sorted(tau.items()))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_layer(
    runs: Sequence[History],
    layer: str,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Probability of each candidate against epoch for one layer, one or more runs overlaid.

    Each candidate has one colour; runs differ by line style (solid, dashed, dotted, …), in
    the style of the FlexAct paper's Figures 1–2.

    Args:
        runs: Histories to overlay (e.g. α = 0.3 and α = 0).
        layer: Layer name as in the history.
        labels: One label per run for the legend.

    Returns:
        The matplotlib figure (one line per run and candidate).
    """
    plt = _pyplot()
    labels = list(labels) if labels else [f"run {i + 1}" for i in range(len(runs))]
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    candidates: list[str] = []
    for history in runs:
        for cand in history.series.get(layer, {}):
            if cand not in candidates:
                candidates.append(cand)
    colours = plt.get_cmap("tab10")
    for r, history in enumerate(runs):
        for c, cand in enumerate(candidates):
            points = history.series.get(layer, {}).get(cand)
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            name = cand if len(runs) == 1 else f"{cand} ({labels[r]})"
            ax.plot(xs, ys, styles[r % len(styles)], color=colours(c % 10), label=name,
                    linewidth=1.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("selection probability")
    ax.set_ylim(-0.02, 1.02)
    title = f"FlexAct selection: {layer}"
    if len(runs) > 1:
        title += " — " + " vs ".join(labels)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _safe_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", layer) or "flexact"


def plot_history(
    history_path: str | Path,
    out_dir: str | Path | None = None,
    compare: Sequence[str | Path] = (),
    labels: Sequence[str] | None = None,
) -> list[Path]:
    """Draw one PNG per layer from a history CSV, optionally overlaying other runs.

    Args:
        history_path: The main run's ``selection_history.csv``.
        out_dir: Folder for the PNGs (default: beside the CSV).
        compare: Further histories to overlay.
        labels: Legend labels, one per run (main run first).

    Returns:
        Paths of the written PNG files, ``selection_<layer>.png`` each.
    """
    runs = [read_history(history_path), *(read_history(p) for p in compare)]
    if labels is not None and len(labels) != len(runs):
        raise ConfigError(f"got {len(labels)} labels for {len(runs)} runs; give one per run")
    out = Path(out_dir) if out_dir is not None else Path(history_path).parent
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    paths = []
    for layer in runs[0].layers:
        fig = plot_layer(runs, layer, labels)
        path = out / f"selection_{_safe_name(layer)}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def heatmap_image(
    probabilities: Sequence[Sequence[float]], layers: Sequence[str], candidates: Sequence[str],
    title: str = "selection probability",
) -> np.ndarray:
    """Render a layer × candidate matrix as an RGB image (H, W, 3), uint8.

    Args:
        probabilities: One row per layer, one value per candidate (NaN where a layer lacks one).
        layers: Row labels.
        candidates: Column labels.
        title: Figure title.
    """
    plt = _pyplot()
    matrix = np.asarray(probabilities, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(candidates), 1.0 + 0.45 * len(layers)),
                           dpi=100)
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(candidates)), candidates, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if not math.isnan(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] < 0.6 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    rgba = plt.imread(buffer)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """``flexact plot``: redraw selection plots from ``selection_history.csv`` files."""
    parser = argparse.ArgumentParser(
        prog="flexact plot",
        description="Plot selection probability against epoch for each FlexAct layer.",
    )
    parser.add_argument("history", help="selection_history.csv of a run")
    parser.add_argument("--compare", nargs="*", default=[],
                        help="further histories to overlay (e.g. the α = 0 run)")
    parser.add_argument("--labels", nargs="*", default=None,
                        help="legend labels, one per run, main run first")
    parser.add_argument("--out", default=None, help="output folder (default: beside the CSV)")
    args = parser.parse_args(argv)
    try:
        paths = plot_history(args.history, args.out, args.compare, args.labels)
    except ConfigError as err:
        parser.exit(2, f"flexact plot: error: {err}\n")
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
