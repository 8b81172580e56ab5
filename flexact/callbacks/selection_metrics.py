"""``SelectionMetrics``: log the selection through any logger and keep its history as state."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import Callback

from flexact.callbacks._checks import check_flag, check_name, check_positive_int
from flexact.callbacks.selection_history import SelectionHistory
from flexact.callbacks.selection_summary import Summary, selection_metrics, selection_summary

__all__ = ["SelectionMetrics"]


class SelectionMetrics(Callback):
    """Log each FlexAct layer's selection probabilities, entropy and pick, and keep a history.

    Keys are ``selection/<layer>/<candidate>``, ``selection/<layer>/entropy`` and
    ``selection/<layer>/pick`` (the picked candidate's index), identical on every rank, sent to
    every logger of the trainer. Each record also adds rows to the history (step, epoch, layer,
    candidate, probability, τ), which is saved in checkpoints and restored on resume; rank 0
    keeps ``selection_history.csv`` in the run's log directory up to date every epoch and at the
    end of fit by appending the new rows, so a resumed run's file covers the whole run.

    Records are made at the start of training, every ``every_n_steps`` optimizer steps and after
    the last batch of every epoch (before validation, so epoch-end checkpoints hold it), at most
    one per step. A record reads τ once.

    Args:
        every_n_steps: Record every this many optimizer steps (and at every epoch end).
        log_entropy: Also log the selection entropy of each layer.
        history_filename: Name of the CSV file with the selection history.
    """

    def __init__(
        self,
        every_n_steps: PositiveInt = 50,
        log_entropy: bool = True,
        history_filename: str = "selection_history.csv",
    ) -> None:
        owner = type(self).__name__
        self.every_n_steps = check_positive_int(owner, "every_n_steps", every_n_steps)
        self.log_entropy = check_flag(owner, "log_entropy", log_entropy)
        self.history_filename = check_name(owner, "history_filename", history_filename)
        self.summary: Summary = {}
        self.summary_step: int | None = None
        self.selection_history = SelectionHistory()
        self.history_path: str | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(history_filename=self.history_filename)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The history rows so far (restored ones included after a resume)."""
        return self.selection_history.rows

    # ------------------------------------------------------------------ helpers
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

    def current_summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Summary:
        """The summary at the trainer's step, read from the model at most once per step."""
        if self.summary_step != trainer.global_step:
            self.summary = selection_summary(pl_module)
            self.summary_step = trainer.global_step
        return self.summary

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self.selection_history.last_step == step:
            return  # already recorded at this step (epoch end right after a step record)
        summary = self.current_summary(trainer, pl_module)
        if not summary:
            return
        self.selection_history.add(step, self._epoch(trainer), summary)
        metrics = selection_metrics(summary, self.log_entropy)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _write_history(self, log_dir: str) -> None:
        """Rank 0: bring the history CSV up to date."""
        if self.history:
            path = self.selection_history.write(os.path.join(log_dir, self.history_filename))
            self.history_path = str(path)

    def _finish(self, trainer: L.Trainer, log_dir: str) -> None:
        """Rank 0, end of fit: write the outputs (here the history CSV)."""
        self._write_history(log_dir)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.selection_history.forget_file()  # a new run directory: the first write is whole

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:  # the starting point of every curve; a resume keeps its history
            self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        batches = trainer.num_training_batches
        last = isinstance(batches, int) and batch_idx + 1 >= batches
        if last or trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)  # no-op unless the epoch ended early (max_steps)
        log_dir = self._log_dir(trainer)  # on every rank: trainer.log_dir is a collective
        if trainer.is_global_zero:
            self._write_history(log_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.current_summary(trainer, pl_module)
        log_dir = self._log_dir(trainer)  # on every rank: trainer.log_dir is a collective
        if trainer.is_global_zero:
            self._finish(trainer, log_dir)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.selection_history.state_dict(), "summary": self.summary,
                "summary_step": self.summary_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.selection_history.load_state_dict(state_dict.get("history", {}))
        self.summary = state_dict.get("summary", self.summary)
        self.summary_step = state_dict.get("summary_step", self.summary_step)
