"""``RunCheckpoint``: every run's ``last.ckpt``, refreshed every few minutes, to resume from.

A killed job (``kill -9``, a preempted node, a lost SSH session) loses only what it trained
since the newest checkpoint; with one checkpoint per epoch that can be hours. ``RunCheckpoint``
keeps ``last.ckpt`` up to date at every epoch end and, in the middle of an epoch, every
``every_n_minutes`` minutes and/or every ``every_n_train_steps`` optimizer steps, so
``flexact fit ... --ckpt_path .../checkpoints/last.ckpt`` continues bit for bit from at most
that far back.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import lightning as L
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from flexact.callbacks._checks import check_positive_int
from flexact.errors import ConfigError

__all__ = ["RunCheckpoint"]

_DDP_TIME_CHECK_EVERY = 10
"""Under DDP the clock is compared every this many steps (rank 0 decides: one broadcast)."""


def _check_minutes(owner: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise ConfigError(f"{owner} every_n_minutes must be a number > 0 or null, got {value!r}")
    return float(value)


class RunCheckpoint(ModelCheckpoint):
    """The checkpoints of every ``flexact fit``: ``last.ckpt`` often, the latest epoch kept.

    Writes, in ``<log dir>/checkpoints/``:

    - ``last.ckpt`` at every epoch end, at the end of training, and in the middle of an epoch
      whenever ``every_n_minutes`` have passed since it was last written or the optimizer step
      is a multiple of ``every_n_train_steps`` (either trigger may be ``null``). It is what
      ``--ckpt_path .../last.ckpt`` (or ``--ckpt_path last``) resumes from; a kill loses at most
      one interval.
    - ``epoch=E-step=S.ckpt``, the latest epoch's checkpoint (Lightning's default checkpoint),
      unless the trainer has a ``ModelCheckpoint`` of the user's: then that one writes the
      epoch files and this one only ``last.ckpt``. When the user's own checkpoint already
      writes ``last.ckpt`` (``save_last``), this one writes nothing.

    Mid-epoch saves happen only after an optimizer step (never inside a gradient-accumulation
    window) and not on an epoch's last batch (the epoch-end save follows). The loggers are
    flushed before each save and after the next batch starts, so the TensorBoard events of a
    killed run reach at least its newest checkpoint. The ``flexact`` CLI adds one to every run
    (configure it under ``checkpoint:``, e.g. ``--checkpoint.every_n_minutes 2``);
    ``--trainer.enable_checkpointing false`` turns it off.

    Args:
        every_n_minutes: Refresh ``last.ckpt`` mid-epoch after this many minutes (``null``: off).
        every_n_train_steps: Refresh ``last.ckpt`` every this many optimizer steps (``null``:
            off).
    """

    def __init__(self, every_n_minutes: PositiveFloat | None = 5.0,
                 every_n_train_steps: PositiveInt | None = None) -> None:
        owner = type(self).__name__
        self.every_n_minutes = _check_minutes(owner, every_n_minutes)
        self.every_n_train_steps = (None if every_n_train_steps is None else
                                    check_positive_int(owner, "every_n_train_steps",
                                                       every_n_train_steps))
        super().__init__(save_last=True, save_top_k=1, every_n_epochs=1)
        self.active = True
        """False when another ModelCheckpoint of the trainer writes ``last.ckpt``."""
        self.epoch_checkpoints = True
        """False when another ModelCheckpoint of the trainer writes the epoch files."""
        self.resumes_in_place = False
        """Set when the run resumes in its checkpoint's folder: no warning that it is not empty."""
        self._last_save_time = time.monotonic()
        self._last_written_step: int | None = None
        self._flush_next_batch = False

    @property
    def state_key(self) -> str:
        # One per trainer: a run resumed with another interval still finds its state.
        return self._generate_state_key()

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        others = [c for c in trainer.checkpoint_callbacks if c is not self]
        self.active = not any(c.save_last for c in others)
        self.epoch_checkpoints = not others
        if not self.active:
            rank_zero_info(f"{type(self).__name__}: another ModelCheckpoint writes last.ckpt; "
                           "flexact's default checkpoint is off")
            self.save_top_k = 0  # nothing of its own: no warning about a non-empty folder
        with warnings.catch_warnings():
            if self.resumes_in_place:  # the folder holds this run's own checkpoints
                warnings.filterwarnings("ignore", message="Checkpoint directory .* not empty")
            super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save_time = time.monotonic()

    # ------------------------------------------------------------------ triggers
    def _time_due(self, trainer: L.Trainer) -> bool:
        """Whether ``every_n_minutes`` have passed; the same answer on every rank."""
        if self.every_n_minutes is None:
            return False
        distributed = trainer.world_size > 1
        if distributed and trainer.global_step % _DDP_TIME_CHECK_EVERY:
            return False  # a broadcast per step would synchronize the host every step
        due = time.monotonic() - self._last_save_time >= 60.0 * self.every_n_minutes
        return bool(trainer.strategy.broadcast(due)) if distributed else due

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._flush_next_batch:  # what was logged after the save, e.g. this step's loss
            self._flush_next_batch = False
            for logger in trainer.loggers:
                logger.save()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.active or (batch_idx + 1) % max(trainer.accumulate_grad_batches, 1):
            return  # inside an accumulation window: the gradients are not in the checkpoint
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch-end save follows
        steps = self.every_n_train_steps
        step_due = steps is not None and trainer.global_step % steps == 0
        if not (step_due or self._time_due(trainer)) or self._should_skip_saving_checkpoint(
                trainer):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # ------------------------------------------------------------------ saving
    def _save_topk_checkpoint(self, trainer: L.Trainer,
                              monitor_candidates: dict[str, Tensor]) -> None:
        if not self.active:
            return
        if self.epoch_checkpoints:
            super()._save_topk_checkpoint(trainer, monitor_candidates)
        else:  # the epoch-end save of last.ckpt alone
            self._save_last_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: L.Trainer,
                              monitor_candidates: dict[str, Tensor]) -> None:
        if not self.active or trainer.fast_dev_run or (
                self._last_written_step == trainer.global_step):
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_step = trainer.global_step
        self._last_save_time = time.monotonic()

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        for logger in trainer.loggers:  # events up to the checkpoint are on disk before it
            logger.save()
        super()._save_checkpoint(trainer, filepath)
        self._flush_next_batch = True
