"""``FlexActHead``: an affine map followed by FlexAct, optionally followed by a second one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from flexact.errors import check_positive_ints
from flexact.nn.layer import FlexAct
from flexact.nn.spec import FlexActSpec

__all__ = ["FlexActHead"]


class FlexActHead(nn.Module):
    """Affine map followed by FlexAct, optionally followed by a second affine map.

    Without ``hidden_features``: ``Linear(in, out) → FlexAct`` (the paper's single-layer model).
    With it: ``Linear(in, hidden) → FlexAct → Linear(hidden, out)`` (FlexAct at the penultimate
    layer, as the paper's CIFAR models). Inputs with more than two dimensions are flattened.
    The regularizer's gradients are measured through the first affine map (docs/method.md
    eq. 1).

    Args:
        in_features: Size of each input sample; ``None``: sized at the first batch.
        out_features: Size of each output sample.
        hidden_features: Width of the FlexAct layer between two affine maps, or ``None``.
        spec: The FlexAct layer's settings (:class:`~flexact.FlexActSpec`, a mapping of its
            fields, or a list of candidate names).
        regularize: Measure gradient norms for the regularizer in training.
        **settings: Fields of :class:`~flexact.FlexActSpec` that replace the spec's.
    """

    def __init__(
        self,
        in_features: int | None,
        out_features: int,
        hidden_features: int | None = None,
        spec: FlexActSpec | Mapping[str, Any] | Sequence[str] | None = None,
        *,
        regularize: bool = True,
        **settings: Any,
    ) -> None:
        super().__init__()
        check_positive_ints(in_features=in_features, out_features=out_features,
                            hidden_features=hidden_features)
        spec = FlexActSpec.build(spec, **settings)
        width = hidden_features or out_features
        self.linear = nn.Linear(in_features, width) if in_features else nn.LazyLinear(width)
        self.flexact = FlexAct(spec, num_channels=width if spec.granularity == "channel" else None,
                               channel_dim=-1, regularize=regularize)
        self.output = nn.Linear(width, out_features) if hidden_features else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2:
            x = x.flatten(1)
        h = self.linear(x)
        if isinstance(self.flexact, FlexAct):
            h = self.flexact(h, input_weight=self.linear.weight)
        else:  # frozen by freeze_selection: a plain activation module
            h = self.flexact(h)
        return h if self.output is None else self.output(h)
