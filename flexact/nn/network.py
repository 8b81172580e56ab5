"""``FlexActNetwork``: any backbone followed by a FlexAct head, as one plain ``nn.Module``.

This is the network a Lightning module trains (``module.model``) and ``flexact export``
freezes; it can be built and trained without Lightning::

    net = FlexActNetwork.build(torchvision.models.resnet18(), out_features=10,
                               hidden_features=512, spec=FlexActSpec(kl_lambda=0.3))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flexact.errors import ConfigError
from flexact.nn.head import FlexActHead
from flexact.nn.spec import FlexActSpec
from flexact.nn.surgery import Swap, swap_activations

__all__ = ["FlexActNetwork", "infer_features", "strip_classifier"]

_FEATURE_ATTRIBUTES = ("out_features", "num_features", "feature_dim", "embed_dim")
_LAZY_WIDTH = 512  # the penultimate width where the feature size is only known at run time
SpecLike = FlexActSpec | Mapping[str, Any] | Sequence[str] | None


class FlexActNetwork(nn.Module):
    """``head(backbone(x))``: a feature extractor and a :class:`~flexact.FlexActHead`.

    Args:
        backbone: Feature extractor (``None``: raw features go straight to the head).
        head: The head, usually a :class:`~flexact.FlexActHead`.
        swaps: The backbone's activation sites replaced by FlexAct layers, if any.
    """

    def __init__(self, backbone: nn.Module | None, head: nn.Module,
                 swaps: Sequence[Swap] = ()) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else nn.Identity()
        self.head = head
        self.swaps = list(swaps)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def is_materialized(self) -> bool:
        """Whether every parameter has its size (no lazily sized layer is waiting for data)."""
        return not any(isinstance(p, nn.parameter.UninitializedParameter)
                       for p in self.parameters())

    @torch.no_grad()
    def materialize(self, x: Tensor) -> None:
        """Size lazily sized layers from a sample input (no statistics or state change)."""
        was_training = self.training
        self.eval()
        try:
            self(x[:2])
        finally:
            self.train(was_training)

    @classmethod
    def build(
        cls,
        backbone: nn.Module | None,
        out_features: int,
        *,
        in_features: int | None = None,
        hidden_features: int | Literal["same"] | None = None,
        spec: SpecLike = None,
        swap_backbone: bool = False,
        backbone_spec: SpecLike = None,
        example_input_shape: Sequence[int] | None = None,
        regularize: bool = True,
    ) -> FlexActNetwork:
        """A backbone and a FlexAct head sized to it.

        Args:
            backbone: Any ``nn.Module`` (a torchvision model's final classifier is stripped),
                or ``None`` for raw features.
            out_features: Outputs of the head (classes, regression targets).
            in_features: Size of the raw features when there is no backbone. With a backbone
                the size comes from the backbone (:func:`infer_features`); a backbone that does
                not tell it gets a head whose first layer is sized at the first batch
                (``nn.LazyLinear``; :meth:`materialize` does it ahead of time).
            hidden_features: Width of the FlexAct layer between two affine maps (FlexAct at
                the penultimate layer; ``"same"``: the feature size, or 512 where the backbone
                does not tell it); ``None``: one affine map followed by FlexAct.
            spec: Settings of the head's FlexAct layer (and of the backbone's sites unless
                ``backbone_spec`` is given).
            swap_backbone: Replace every activation module of the backbone by a FlexAct layer.
            backbone_spec: Settings of the swapped backbone sites (default: ``spec``).
            example_input_shape: One input sample's shape, for a dry run (size inference and
                per-channel swaps).
            regularize: Measure gradient norms for the regularizer in training.
        """
        spec = FlexActSpec.build(spec)
        if backbone is None:
            if in_features is None:
                raise ConfigError("without a backbone the head needs in_features (the size of "
                                  "the raw features): set it, or use a data module that has "
                                  "a `num_features` attribute")
            backbone, features = nn.Identity(), in_features
        else:
            features = strip_classifier(backbone) or infer_features(backbone, example_input_shape)
        if hidden_features == "same":
            hidden_features = features or _LAZY_WIDTH
        head = FlexActHead(features, out_features, hidden_features, spec, regularize=regularize)
        swaps: list[Swap] = []
        if swap_backbone:
            site_spec = FlexActSpec.build(backbone_spec if backbone_spec is not None else spec)
            example = None
            if site_spec.granularity == "channel":
                if not example_input_shape:
                    raise ConfigError("swap_backbone with granularity='channel' needs "
                                      "example_input_shape (one sample's shape)")
                example = torch.zeros(2, *example_input_shape)
            swaps = swap_activations(backbone, site_spec, example_input=example)
            if not swaps:
                raise ConfigError("swap_backbone found no activation module in the backbone to "
                                  "replace")
        return cls(backbone, head, swaps)


def strip_classifier(backbone: nn.Module) -> int | None:
    """Replace a torchvision model's final classifier by ``nn.Identity`` in place.

    Args:
        backbone: A model, e.g. ``torchvision.models.resnet18()``.

    Returns:
        The stripped layer's ``in_features``, or ``None`` if nothing was stripped (the model is
        not from torchvision, or has no recognizable final linear layer).
    """
    if not type(backbone).__module__.startswith("torchvision.models"):
        return None
    for attr in ("fc", "classifier", "head", "heads"):
        layer = getattr(backbone, attr, None)
        if isinstance(layer, nn.Linear):
            setattr(backbone, attr, nn.Identity())
            return layer.in_features
        if isinstance(layer, nn.Sequential) and len(layer) and isinstance(layer[-1], nn.Linear):
            in_features = layer[-1].in_features
            layer[-1] = nn.Identity()
            return in_features
    return None


def infer_features(backbone: nn.Module, example_input_shape: Sequence[int] | None) -> int | None:
    """The size of the backbone's features, or ``None`` if the backbone does not tell it.

    From an attribute ``out_features``/``num_features``/``feature_dim``/``embed_dim``, else by
    one dry run on a zero input of ``example_input_shape``.
    """
    for attr in _FEATURE_ATTRIBUTES:
        value = getattr(backbone, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    if not example_input_shape:
        return None
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        features = backbone(torch.zeros(2, *example_input_shape))
    backbone.train(was_training)
    return int(features.flatten(1).shape[1])
