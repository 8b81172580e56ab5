"""Classification with a FlexAct head."""

from __future__ import annotations

from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from flexact.errors import ConfigError
from flexact.modules.base import FlexActModule

__all__ = ["FlexActClassifier"]


class FlexActClassifier(FlexActModule):
    """Multi-class classifier: cross-entropy on the head's logits, accuracy as metric.

    Takes every argument of :class:`FlexActModule`; ``num_outputs`` is the number of classes.
    ``predict_step`` returns class indices.
    """

    def configure_losses(self) -> None:
        """Cross-entropy."""
        self.criterion = nn.CrossEntropyLoss()

    def configure_metrics(self) -> None:
        """Top-1 accuracy."""
        num_classes = self.num_outputs
        if num_classes < 2:
            raise ConfigError(f"classification needs num_outputs >= 2 classes, got {num_classes}")
        metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes=num_classes)})
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    def predictions(self, outputs: Tensor) -> Tensor:
        """Class index of the largest logit."""
        return outputs.argmax(dim=-1)
