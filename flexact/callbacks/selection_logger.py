"""``SelectionLogger``: the selection metrics plus the dashboard and end-of-fit reports."""

from __future__ import annotations

import os

import lightning as L
from jsonargparse.typing import PositiveInt
from lightning.pytorch.utilities import rank_zero_info

from flexact.callbacks._checks import check_flag, check_name
from flexact.callbacks.selection_metrics import SelectionMetrics
from flexact.callbacks.selection_reports import (
    add_channel_histograms,
    add_final_text,
    add_heatmap,
    add_layout,
    format_table,
    tensorboard_writer,
    write_summary_json,
)
from flexact.callbacks.selection_summary import selection_summary
from flexact.errors import ConfigError
from flexact.tools.plot import plot_history

__all__ = ["SelectionLogger", "format_table", "selection_summary"]


class SelectionLogger(SelectionMetrics):
    """Log each FlexAct layer's selection probabilities, entropy and pick through any logger.

    Keys are ``selection/<layer>/<candidate>``, ``selection/<layer>/entropy`` and
    ``selection/<layer>/pick`` (the picked candidate's index), identical on every rank. The
    history of the records (step, epoch, layer, candidate, probability, τ) is saved in
    checkpoints and kept in ``selection_history.csv`` in the run's log directory, appended every
    epoch; after a resume the file covers the whole run. At the end of fit it prints a table of
    the final picks and writes ``selection.json`` (final picks) and one PNG per layer of
    probability against epoch.

    With a ``TensorBoardLogger`` it also builds a dashboard: a "Custom Scalars" category per
    layer with one chart per candidate (so that runs compared in one chart are told apart by
    colour) and one of its entropy, a chart of τ, a layer × candidate heatmap image every epoch
    (for per-channel layers: the share of channels that picked each candidate, and histograms
    of their probabilities), and the final picks as text. TensorBoard shows 10 images per tag,
    picked at random, unless started with ``--samples_per_plugin images=1000`` (up to 1000).
    Only rank 0 writes files and images.

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
        super().__init__(every_n_steps, log_entropy, history_filename)
        owner = type(self).__name__
        self.filename = check_name(owner, "filename", filename)
        if filename == history_filename:
            raise ConfigError(f"{owner} filename and history_filename must differ, both are "
                              f"{filename!r}")
        self.plots = check_flag(owner, "plots", plots)
        self.heatmap = check_flag(owner, "heatmap", heatmap)
        self.output_path: str | None = None
        self.plot_paths: list[str] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        writer = tensorboard_writer(trainer)
        if writer is not None:
            add_layout(writer, pl_module, self.log_entropy)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        writer = tensorboard_writer(trainer)
        if writer is None or not self.heatmap:
            return
        summary = self.current_summary(trainer, pl_module)  # this step's record: no new read
        if summary:
            add_heatmap(writer, summary, trainer.global_step)
            add_channel_histograms(writer, pl_module, trainer.global_step)

    def _finish(self, trainer: L.Trainer, log_dir: str) -> None:
        super()._finish(trainer, log_dir)  # the history CSV
        rank_zero_info("FlexAct selection:\n" + format_table(self.summary))
        for callback in trainer.callbacks:  # each layer's commit step (SelectionCommit)
            for name, step in getattr(callback, "committed_steps", {}).items():
                if name in self.summary:
                    self.summary[name]["committed_at"] = step
            for name, verdict in getattr(callback, "verdicts", {}).items():
                if name in self.summary:  # its check at the commit (verify: true)
                    self.summary[name]["commit_check"] = verdict
        self.output_path = write_summary_json(os.path.join(log_dir, self.filename), self.summary)
        if self.plots and self.history_path is not None:
            self.plot_paths = [str(p) for p in plot_history(self.history_path, log_dir)]
        writer = tensorboard_writer(trainer)
        if writer is not None and self.summary:
            add_final_text(writer, self.summary, trainer.global_step)
