"""``TemperatureAnnealing``: anneal τ of every FlexAct layer from the trainer's progress."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import Callback

from flexact.callbacks._checks import check_choice
from flexact.callbacks.progress import logs_this_step, progress_position, run_length
from flexact.errors import ConfigError
from flexact.nn import FlexAct, flexact_layers
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
    ``tau`` on the steps where Lightning writes step metrics (``log_every_n_steps``).

    The ``flexact`` command gives every run one, configured under ``temperature:``
    (``--temperature.end 1e-3`` on the command line) and off until ``start`` or ``end`` is set
    there; one listed in ``trainer.callbacks`` takes its place.

    Args:
        start: τ at the start of training (after any warm-up); ``None``: the τ each FlexAct
            layer was built with (the model's ``flexact.tau``).
        end: τ at the end of the annealing; ``None``: no annealing, τ stays at ``start``
            (with both ``None`` the callback does nothing).
        schedule: ``exponential`` (geometric), ``linear``, ``cosine`` or ``constant`` (τ = start).
        interval: Advance per optimizer ``step`` or per ``epoch``.
        warmup: Number of intervals to hold τ at ``start`` before annealing.
        total: Number of intervals until τ reaches ``end`` (warm-up included); defaults to the
            whole run (``trainer.estimated_stepping_batches`` or ``max_epochs``).
    """

    def __init__(
        self,
        start: PositiveFloat | None = None,
        end: PositiveFloat | None = 0.1,
        schedule: Schedule = "exponential",
        interval: Literal["step", "epoch"] = "step",
        warmup: NonNegativeInt = 0,
        total: PositiveInt | None = None,
    ) -> None:
        start = None if start is None else check_tau(start, "TemperatureAnnealing start")
        end = None if end is None else check_tau(end, "TemperatureAnnealing end")
        check_choice("TemperatureAnnealing", "schedule", schedule,
                     ("exponential", "linear", "cosine", "constant"))
        check_choice("TemperatureAnnealing", "interval", interval, ("step", "epoch"))
        if warmup < 0 or (total is not None and total <= warmup):
            raise ConfigError(f"need 0 <= warmup < total, got warmup={warmup}, total={total}")
        self.start = None if start is None else float(start)
        self.end = None if end is None else float(end)
        self.schedule: Schedule = schedule
        self.interval = interval
        self.warmup = int(warmup)
        self.total = total
        self.current_tau = self.start
        self._built: tuple[int, dict[str, float]] = (0, {})  # (id of the module, τ per layer)
        self._layers: list[tuple[str, FlexAct]] | None = None  # this fit's layers

    @property
    def active(self) -> bool:
        """Whether the callback sets τ at all (``start`` or ``end`` given)."""
        return self.start is not None or self.end is not None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(start=self.start, end=self.end, schedule=self.schedule,
                                        interval=self.interval)

    def tau_for(self, trainer: L.Trainer, start: float | None = None) -> float:
        """τ for the trainer's current progress, from ``start`` (default: :attr:`start`)."""
        start = self.start if start is None else start
        if start is None:
            raise ConfigError("TemperatureAnnealing(start=None) starts from each layer's own τ: "
                              "pass tau_for(trainer, start)")
        if self.end is None:
            return start
        position = progress_position(trainer, self.interval)
        total = run_length(trainer, self.interval, self.total, "TemperatureAnnealing")
        span = max(total - self.warmup, 1)
        return temperature_at((position - self.warmup) / span, start, self.end, self.schedule)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before a checkpoint is restored: the τ each layer was built with.
        if self._built[0] != id(pl_module):
            self._built = (id(pl_module), {name: float(layer.tau)
                                           for name, layer in flexact_layers(pl_module)})

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        built = self._built[1]
        layers = self._layers if self._layers is not None else list(flexact_layers(pl_module))
        for i, (name, layer) in enumerate(layers):
            start = self.start if self.start is not None else (
                built[name] if name in built else float(layer.tau))  # no device read per step
            tau = self.tau_for(trainer, start)
            layer.tau = tau
            if i == 0:
                self.current_tau = tau

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Walked once per fit: on a small model the walk cost as much as the mixture.
        self._layers = list(flexact_layers(pl_module))
        self._apply(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._layers = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply(trainer, pl_module)
        # Only where the logger writes step metrics (and once an epoch, for callback_metrics):
        # a self.log call costs ~1 ms here, as much as a small model's whole step.
        if self.active and self.current_tau is not None and (
                batch_idx == 0 or logs_this_step(trainer)):
            pl_module.log("tau", self.current_tau, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        if not self.active:
            return {}  # nothing to save (Lightning stores no state for it)
        return {"current_tau": self.current_tau, "start": self.start, "end": self.end,
                "schedule": self.schedule, "interval": self.interval, "warmup": self.warmup,
                "total": self.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # τ itself is recomputed from the restored progress; keep the last value for reporting.
        self.current_tau = state_dict.get("current_tau", self.current_tau)
