"""``TemperatureAnnealing``: anneal τ of every FlexAct layer from the trainer's progress."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import Callback

from flexact.callbacks.progress import progress_position, run_length
from flexact.errors import ConfigError
from flexact.nn import flexact_layers
from flexact.nn.spec import check_tau

__all__ = ["TemperatureAnnealing", "temperature_at"]

Schedule = Literal["exponential", "linear", "cosine", "constant"]


def temperature_at(progress: float, start: float, end: float, schedule: Schedule) -> float:
    """τ at a fraction ``progress`` ∈ [0, 1] of the annealing.

    Args:
        progress: Fraction of the annealing done (clamped to [0, 1]).
        start: τ at progress 0.
        end: τ at progress 1.
        schedule: Shape of the curve between them.

    Returns:
        The temperature.
    """
    t = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * t
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "exponential":
        return start * (end / start) ** t
    raise ConfigError(f"unknown schedule {schedule!r}")


class TemperatureAnnealing(Callback):
    """Anneal the Gumbel-Softmax temperature τ of every FlexAct layer in the model.

    τ is a pure function of the trainer's progress (``global_step`` or ``current_epoch``), so
    every DDP rank agrees and a resumed run continues exactly where it stopped. τ is logged as
    ``tau``.

    Args:
        start: τ at the start of training (after any warm-up).
        end: τ at the end of the annealing.
        schedule: ``exponential`` (geometric), ``linear``, ``cosine`` or ``constant`` (τ = start).
        interval: Advance per optimizer ``step`` or per ``epoch``.
        warmup: Number of intervals to hold τ at ``start`` before annealing.
        total: Number of intervals until τ reaches ``end`` (warm-up included); defaults to the
            whole run (``trainer.estimated_stepping_batches`` or ``max_epochs``).
    """

    def __init__(
        self,
        start: PositiveFloat = 1.0,
        end: PositiveFloat = 0.1,
        schedule: Schedule = "exponential",
        interval: Literal["step", "epoch"] = "step",
        warmup: NonNegativeInt = 0,
        total: PositiveInt | None = None,
    ) -> None:
        start = check_tau(start, "TemperatureAnnealing start")
        end = check_tau(end, "TemperatureAnnealing end")
        if schedule not in ("exponential", "linear", "cosine", "constant"):
            raise ConfigError(f"schedule must be exponential, linear, cosine or constant, "
                              f"got {schedule!r}")
        if interval not in ("step", "epoch"):
            raise ConfigError(f"interval must be 'step' or 'epoch', got {interval!r}")
        if warmup < 0 or (total is not None and total <= warmup):
            raise ConfigError(f"need 0 <= warmup < total, got warmup={warmup}, total={total}")
        self.start = float(start)
        self.end = float(end)
        self.schedule: Schedule = schedule
        self.interval = interval
        self.warmup = int(warmup)
        self.total = total
        self.current_tau = self.start

    @property
    def state_key(self) -> str:
        return self._generate_state_key(start=self.start, end=self.end, schedule=self.schedule,
                                        interval=self.interval)

    def tau_for(self, trainer: L.Trainer) -> float:
        """τ for the trainer's current progress."""
        position = progress_position(trainer, self.interval)
        total = run_length(trainer, self.interval, self.total, "TemperatureAnnealing")
        span = max(total - self.warmup, 1)
        return temperature_at((position - self.warmup) / span, self.start, self.end,
                              self.schedule)

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tau = self.tau_for(trainer)
        for _, layer in flexact_layers(pl_module):
            layer.tau = tau
        self.current_tau = tau

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply(trainer, pl_module)
        pl_module.log("tau", self.current_tau, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"current_tau": self.current_tau, "start": self.start, "end": self.end,
                "schedule": self.schedule, "interval": self.interval, "warmup": self.warmup,
                "total": self.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # τ itself is recomputed from the restored progress; keep the last value for reporting.
        self.current_tau = state_dict.get("current_tau", self.current_tau)
