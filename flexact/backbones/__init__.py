"""Backbones: feature extractors for the FlexAct modules (docs/method.md §3.2 and §4).

Each takes its hidden activation by registry name (``relu``, ``adaptive_gumbel``, ...), or
``flexact`` / ``flexact_channel`` for a :class:`~flexact.FlexAct` at every activation site, and
exposes ``out_features``, the size of the features it returns (the model's head reads it).
Usable from YAML: ``backbone: {class_path: CifarResNet, init_args: {depth: 34}}``.
"""

from flexact.backbones._activation import FLEXACT_NAMES, build_activation
from flexact.backbones.lenet import LeNet5
from flexact.backbones.mlp import MLP
from flexact.backbones.resnet import CifarResNet, cifar_resnet18, cifar_resnet34
from flexact.backbones.text_cnn import TextCNN

__all__ = [
    "FLEXACT_NAMES",
    "MLP",
    "CifarResNet",
    "LeNet5",
    "TextCNN",
    "build_activation",
    "cifar_resnet18",
    "cifar_resnet34",
]
