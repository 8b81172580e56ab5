"""Regression with a FlexAct head."""

from __future__ import annotations

from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from flexact.modules.base import FlexActModule

__all__ = ["FlexActRegressor"]


class FlexActRegressor(FlexActModule):
    """Regression: mean-squared error loss, MSE and MAE as metrics.

    Takes every argument of :class:`FlexActModule`; ``num_outputs`` is the number of targets
    (1 by default).
    """

    default_num_outputs = 1

    def configure_losses(self) -> None:
        """Mean-squared error."""
        self.criterion = nn.MSELoss()

    def configure_metrics(self) -> None:
        """MSE and MAE."""
        metrics = MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError()})
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    def targets_like(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Reshape ``(B,)`` targets to ``(B, 1)`` outputs, and match the outputs' dtype."""
        if targets.shape != outputs.shape and targets.numel() == outputs.numel():
            targets = targets.reshape(outputs.shape)
        return targets.to(outputs.dtype)
