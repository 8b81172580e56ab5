"""``SelectionCommit``: fix every FlexAct layer's pick for the last part of training."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from jsonargparse.typing import ClosedUnitInterval, PositiveInt
from lightning.pytorch.callbacks import Callback

from flexact.callbacks._checks import check_positive_int
from flexact.callbacks.progress import progress_position, run_length
from flexact.errors import ConfigError
from flexact.nn import flexact_layers

__all__ = ["SelectionCommit"]


class SelectionCommit(Callback):
    """Commit every FlexAct layer to its pick after a fraction of training.

    Before the commit the layers select as usual (Gumbel-Softmax mixture plus regularizer);
    after it they apply exactly the picked activation in training too, so the remaining steps
    fine-tune the weights to the activation that evaluation uses. Without it, the weights end
    fitted to a blend whenever the selection is not one-hot, which the bias-correcting KL keeps
    it from becoming (see benchmarks/RESULTS.md, Table 1). Not part of the paper's method.

    The commit is a pure function of the trainer's progress, so resumed and multi-device runs
    agree. Its state (whether and at which position it committed) is saved in checkpoints.

    Args:
        at: Fraction of the run (0–1) after which the layers commit.
        interval: Measure progress in optimizer ``step``s or ``epoch``s.
        total: Length of the run in intervals; defaults to the trainer's.
    """

    def __init__(
        self,
        at: ClosedUnitInterval = 0.7,
        interval: Literal["step", "epoch"] = "step",
        total: PositiveInt | None = None,
    ) -> None:
        if isinstance(at, bool) or not (isinstance(at, (int, float)) and 0.0 <= at <= 1.0):
            raise ConfigError(f"SelectionCommit at must be a fraction in [0, 1], got {at!r}")
        if interval not in ("step", "epoch"):
            raise ConfigError(f"SelectionCommit interval must be 'step' or 'epoch', "
                              f"got {interval!r}")
        self.at = float(at)
        self.interval: Literal["step", "epoch"] = interval
        self.total = None if total is None else check_positive_int("SelectionCommit", "total",
                                                                   total)
        self.committed = False
        self.committed_at: int | None = None
        """Progress position (steps or epochs, per ``interval``) at which the layers committed."""

    @property
    def state_key(self) -> str:
        return self._generate_state_key(at=self.at, interval=self.interval)

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule, force: bool) -> None:
        total = run_length(trainer, self.interval, self.total, "SelectionCommit")
        position = progress_position(trainer, self.interval)
        committed = position >= self.at * total
        if force or committed != self.committed:
            for _, layer in flexact_layers(pl_module):
                layer.commit(committed)
        if committed and self.committed_at is None:
            self.committed_at = position
        elif not committed:
            self.committed_at = None
        self.committed = committed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer, pl_module, force=True)  # also restores the state after a resume

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply(trainer, pl_module, force=False)

    def state_dict(self) -> dict[str, Any]:
        return {"committed": self.committed, "committed_at": self.committed_at, "at": self.at,
                "interval": self.interval}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.committed = state_dict.get("committed", self.committed)
        self.committed_at = state_dict.get("committed_at", self.committed_at)
