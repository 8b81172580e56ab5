"""LeNet5 in the variant of docs/method.md §4: two conv + max-pool layers, one FC hidden layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from flexact.backbones._activation import (
    Activation,
    build_activation,
    check_backbone_activation,
)
from flexact.errors import ConfigError, check_positive_ints

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """LeNet5: conv → act → max-pool → conv → act → max-pool [→ FC → act].

    With the defaults (20 and 50 maps of 5×5, a 1000-unit hidden layer) it is the LeNet5 of the
    adaptive-activation experiments on MNIST. Set ``hidden_features`` to ``null`` to end at the
    flattened conv features and let the model's head play the hidden layer (a FlexActClassifier
    with ``hidden_features: 1000`` is then this LeNet5 with FlexAct at the penultimate layer).

    Args:
        in_channels: Channels of the input images (1 for MNIST, 3 for CIFAR).
        image_size: Height = width of the input images.
        channels: Feature maps of the two convolutions.
        kernel_size: Size of the (unpadded) convolution kernels.
        hidden_features: Units of the FC hidden layer, or ``null`` for none.
        activation: Hidden activation: a registry name, a FlexAct spec (``{candidates: [...],
            tau: ...}``: a FlexAct layer at every site), or ``flexact`` / ``flexact_channel``.
        activation_kwargs: Keyword arguments of the activation.
        dropout: Dropout probability after the hidden layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        channels: Sequence[int] = (20, 50),
        kernel_size: int = 5,
        hidden_features: int | None = 1000,
        activation: Activation = "relu",
        activation_kwargs: dict[str, Any] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_backbone_activation(activation)
        check_positive_ints(in_channels=in_channels, image_size=image_size,
                            kernel_size=kernel_size, hidden_features=hidden_features)
        if len(channels) != 2 or any(c < 1 for c in channels):
            raise ConfigError(f"LeNet5 channels must be two positive ints, got {list(channels)}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout must lie in [0, 1), got {dropout}")
        size = ((image_size - kernel_size + 1) // 2 - kernel_size + 1) // 2
        if size < 1:
            raise ConfigError(f"images of {image_size}×{image_size} are too small for two "
                              f"{kernel_size}×{kernel_size} convolutions with max-pooling")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size),
            build_activation(activation, c1, activation_kwargs),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size),
            build_activation(activation, c2, activation_kwargs),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = c2 * size * size
        self.hidden: nn.Module
        if hidden_features is None:
            self.hidden = nn.Identity()
        else:
            self.hidden = nn.Sequential(
                nn.Linear(flat, hidden_features),
                build_activation(activation, hidden_features, activation_kwargs),
                nn.Dropout(dropout),
            )
        self.out_features = hidden_features or flat
        """Size of the feature vector (the model's head reads it)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.hidden(self.features(x))
