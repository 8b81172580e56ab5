"""CIFAR ResNets (docs/method.md §3.2): torchvision's ResNet, 3×3 stride-1 stem, no max-pool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

from flexact.backbones._activation import (
    Activation,
    build_activation,
    check_backbone_activation,
    norm_activation,
)
from flexact.errors import ConfigError

__all__ = ["CifarResNet", "cifar_resnet18", "cifar_resnet34"]

_LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


class _Block(nn.Module):
    """torchvision's ``BasicBlock`` with its own module at each of its two activation sites.

    (torchvision reuses one ``ReLU`` for both; a FlexAct per site keeps separate selections.)
    Submodule names match ``BasicBlock``, so state dicts of plain ReLU blocks line up.
    """

    def __init__(self, block: BasicBlock, make_act: Callable[[int], nn.Module]) -> None:
        super().__init__()
        width = block.bn2.num_features
        self.conv1, self.bn1, self.act1 = block.conv1, block.bn1, make_act(width)
        self.conv2, self.bn2, self.act2 = block.conv2, block.bn2, make_act(width)
        self.downsample = block.downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = norm_activation(self.act1, self.bn1, self.conv1(x))
        return norm_activation(self.act2, self.bn2, self.conv2(out), identity)


class CifarResNet(ResNet):
    """ResNet18/34 for 32×32 images, returning the 512 pooled features (no classifier).

    torchvision's ResNet with the CIFAR stem: a 3×3 stride-1 convolution and no max-pool, as in
    the paper's CIFAR-10 experiments. Every activation site (the stem and two per block) gets its
    own module built from ``activation``.

    Args:
        depth: 18 or 34 layers.
        activation: Hidden activation: a registry name (``relu``, ``adaptive_gumbel``, ...), a
            FlexAct spec (``{candidates: [...], tau: ...}``: a FlexAct layer at every site), or
            ``flexact`` / ``flexact_channel``.
        activation_kwargs: Keyword arguments of the activation (e.g. FlexAct's ``candidates``).
        in_channels: Channels of the input images.
        zero_init_residual: Zero-initialize the last BatchNorm of each block (torchvision option).
    """

    def __init__(
        self,
        depth: Literal[18, 34] = 18,
        activation: Activation = "relu",
        activation_kwargs: dict[str, Any] | None = None,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        if depth not in _LAYERS:
            raise ConfigError(f"CifarResNet depth must be 18 or 34, got {depth!r}")
        check_backbone_activation(activation)
        super().__init__(BasicBlock, _LAYERS[depth], zero_init_residual=zero_init_residual)

        def make_act(channels: int) -> nn.Module:
            return build_activation(activation, channels, activation_kwargs)

        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.relu = make_act(64)
        self.maxpool = nn.Identity()
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for i, block in enumerate(layer):
                layer[i] = _Block(block, make_act)
        self.fc = nn.Identity()
        self.depth = depth
        self.out_features = 512
        """Size of the feature vector (the model's head reads it)."""

    def _forward_impl(self, x: Tensor) -> Tensor:
        # torchvision's order, with each batch norm and its activation as one step (FlexAct
        # sites then keep no copy of their input for backward).
        x = self.maxpool(norm_activation(self.relu, self.bn1, self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet18(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet18 (512 output features); ``kwargs`` as :class:`CifarResNet`."""
    return CifarResNet(depth=18, **kwargs)


def cifar_resnet34(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet34 (512 output features); ``kwargs`` as :class:`CifarResNet`."""
    return CifarResNet(depth=34, **kwargs)
