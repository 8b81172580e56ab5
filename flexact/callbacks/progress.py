"""Training progress as a pure function of the trainer state (shared by the callbacks)."""

from __future__ import annotations

import math
from typing import Literal

import lightning as L

from flexact.errors import ConfigError

__all__ = ["logs_this_step", "progress_position", "run_length"]

Interval = Literal["step", "epoch"]


def run_length(trainer: L.Trainer, interval: Interval, total: int | None, owner: str,
               fix: str = "set its total") -> int:
    """Number of ``interval`` units in the run: ``total`` if given, else the trainer's length.

    ``fix`` ends the error message: what the owner's user can do about an unknown length.

    Raises:
        ConfigError: If the run's length is unknown (no max_epochs / max_steps, or an iterable
            data set without max_steps, which Lightning reports as -1) and no total.
    """
    if total is not None:
        return total
    if interval == "epoch":
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            raise ConfigError(f"{owner}(interval='epoch') needs trainer max_epochs or an "
                              "explicit total")
        return max(trainer.max_epochs, 1)
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps) or steps < 0:
        raise ConfigError(f"{owner} cannot tell the run's length (infinite training, or a data "
                          f"set without a length and no max_steps): {fix}")
    return max(int(steps), 1)


def progress_position(trainer: L.Trainer, interval: Interval) -> int:
    """Optimizer steps or epochs done so far; identical on every rank and after a resume."""
    return trainer.global_step if interval == "step" else trainer.current_epoch


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning sends this training step's ``on_step`` metrics to the loggers.

    The rule of Lightning's own ``LearningRateMonitor`` (every ``log_every_n_steps``, and every
    step of a ``fast_dev_run``); a Lightning without that private attribute logs every step.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(trainer.fast_dev_run) or bool(getattr(connector, "should_update_logs", True))
