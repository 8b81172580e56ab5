"""A multi-layer perceptron backbone."""

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

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten, then ``Linear → [BatchNorm] → act → [Dropout]`` per hidden layer.

    Args:
        in_features: Size of each (flattened) input sample, e.g. 784 for MNIST.
        hidden: Width of each hidden layer; empty for no layer (the features pass through).
        activation: Hidden activation: a registry name, a FlexAct spec (``{candidates: [...],
            tau: ...}``: a FlexAct layer at every site), or ``flexact`` / ``flexact_channel``.
        activation_kwargs: Keyword arguments of the activation.
        dropout: Dropout probability after each hidden layer.
        batch_norm: BatchNorm after each linear map.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (256,),
        activation: Activation = "relu",
        activation_kwargs: dict[str, Any] | None = None,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        check_backbone_activation(activation)
        check_positive_ints(in_features=in_features)
        if any(h < 1 for h in hidden):
            raise ConfigError(f"MLP hidden widths must be positive, got {list(hidden)}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout must lie in [0, 1), got {dropout}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(build_activation(activation, h, activation_kwargs))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.layers = nn.Sequential(*layers)
        self.out_features = width
        """Size of the feature vector (the model's head reads it)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
