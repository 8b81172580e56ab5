"""Classification with a FlexAct head."""

from __future__ import annotations

from typing import Any

from jsonargparse.typing import PositiveInt
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from flexact.errors import ConfigError
from flexact.modules.base import FlexActModule

__all__ = ["FlexActClassifier"]


class FlexActClassifier(FlexActModule):
    """Multi-class classifier: cross-entropy on the head's logits, accuracy as metric.

    Takes every argument of :class:`FlexActModule`. By default FlexAct sits at the penultimate
    layer, as in the paper (``Linear(features→features) → FlexAct → Linear(features→classes)``;
    ``hidden_features: null`` puts it on the logits instead, which rarely helps a classifier).
    ``predict_step`` returns class indices.

    Args:
        num_classes: Number of classes (taken from the data module under the CLI);
            ``num_outputs`` is the same number under its generic name.
    """

    default_hidden_features = "same"

    def __init__(self, *args: Any, num_classes: PositiveInt | None = None,
                 **kwargs: Any) -> None:
        if num_classes is not None:
            given = kwargs.get("num_outputs")
            if given is not None and given != num_classes:
                raise ConfigError(f"num_classes={num_classes} and num_outputs={given} disagree; "
                                  "set one of them (the data module gives num_outputs)")
            kwargs["num_outputs"] = num_classes
        super().__init__(*args, **kwargs)

    def configure_losses(self) -> None:
        """Cross-entropy."""
        self.criterion = nn.CrossEntropyLoss()

    def configure_metrics(self) -> None:
        """Top-1 accuracy."""
        num_classes = self.num_outputs
        if num_classes < 2:
            raise ConfigError(f"classification needs num_classes >= 2, got {num_classes}")
        metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes=num_classes)})
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    def predictions(self, outputs: Tensor) -> Tensor:
        """Class index of the largest logit."""
        return outputs.argmax(dim=-1)

    def sample_errors(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per sample, 1 if misclassified, else 0: what ``SelectionCommit(verify=True)`` compares.

        Not the cross-entropy: with the same weights, a candidate with larger outputs (Identity
        in place of Sigmoid) sharpens every softmax and lowers the loss of each sample already
        right, though it classifies no better.
        """
        return (self.predictions(outputs) != targets).to(outputs.dtype)
