"""The built-in candidate activations, registered with their closed forms.

The paper's five candidates come first, in the paper's order, and form
:data:`PAPER_CANDIDATES`; then common activations, the parameterized ones (their shapes train
with the weights) and three found by search (docs/method.md §4). Each is registered once with
everything flexact knows about it (:class:`~flexact.nn.registry.Candidate`). Importing any
part of :mod:`flexact.nn` imports this module, so the built-ins are always registered.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexact.errors import ConfigError
from flexact.nn.registry import register_activation

__all__ = [
    "GMTU",
    "PAPER_CANDIDATES",
    "AdaptiveGumbel",
    "AdaptiveReLU",
    "GELUSinc",
    "GELUSine",
    "SwishBeta",
]

PAPER_CANDIDATES: tuple[str, ...] = ("relu", "sigmoid", "tanh", "leaky_relu", "identity")
"""The FlexAct paper's candidate set, in its order."""


def _per_unit(param: Tensor, x: Tensor) -> Tensor:
    """Shape a per-unit parameter to broadcast along dim 1 of ``x`` (as ``nn.PReLU`` does)."""
    if param.numel() == 1 or x.dim() < 2:
        return param.reshape(()) if param.numel() == 1 else param
    return param.reshape((1, -1) + (1,) * (x.dim() - 2))


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


class _ShapeParameterized(nn.Module):
    """Base for activations with a learnable positive shape, stored raw and mapped by softplus."""

    min_shape: float = 1e-3
    max_shape: float = 1e3

    def __init__(self, num_parameters: int = 1, init: float = 1.0) -> None:
        super().__init__()
        if num_parameters < 1:
            raise ConfigError(f"num_parameters must be >= 1, got {num_parameters}")
        if not self.min_shape <= init <= self.max_shape:
            raise ConfigError(
                f"init must lie in [{self.min_shape}, {self.max_shape}], got {init}"
            )
        self.raw_shape = nn.Parameter(torch.full((num_parameters,), _inverse_softplus(init)))

    def shape(self, x: Tensor) -> Tensor:
        """The positive shape parameter, clamped for numerical safety, broadcast to ``x``."""
        alpha = F.softplus(self.raw_shape).clamp(self.min_shape, self.max_shape)
        return _per_unit(alpha, x)


class AdaptiveGumbel(_ShapeParameterized):
    """Adaptive Gumbel: ``1 - (1 + α·eˣ)^(-1/α)`` with learnable per-unit ``α > 0``.

    Computed as ``-expm1(-softplus(x + log α) / α)``, which never overflows. It tends to the
    Gumbel CDF as α → 0 and equals the logistic sigmoid at α = 1.

    Args:
        num_parameters: 1 (shared) or the number of channels (dim 1 of the input).
        init: Initial α.
    """

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.shape(x)
        return -torch.expm1(-F.softplus(x + torch.log(alpha)) / alpha)


class AdaptiveReLU(_ShapeParameterized):
    """Adaptive ReLU: ``x·(1 - e^(-αx))`` for ``x > 0``, else 0; tends to ReLU as α → ∞.

    Args:
        num_parameters: 1 (shared) or the number of channels (dim 1 of the input).
        init: Initial α.
    """

    def forward(self, x: Tensor) -> Tensor:
        positive = F.relu(x)
        return -positive * torch.expm1(-self.shape(x) * positive)


class SwishBeta(nn.Module):
    """Swish-β: ``x·sigmoid(βx)`` with learnable β.

    Args:
        num_parameters: 1 (shared) or the number of channels (dim 1 of the input).
        init: Initial β.
    """

    def __init__(self, num_parameters: int = 1, init: float = 1.0) -> None:
        super().__init__()
        if num_parameters < 1:
            raise ConfigError(f"num_parameters must be >= 1, got {num_parameters}")
        self.beta = nn.Parameter(torch.full((num_parameters,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(_per_unit(self.beta, x) * x)


class GELUSine(nn.Module):
    """``GELU(x) + 0.1·sin(x)``, found by evolutionary search (docs/method.md §4)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x) + 0.1 * torch.sin(x)


class GELUSinc(nn.Module):
    """``GELU(x)·(1 + 0.5·sinc(x))`` with the normalized ``sinc(x) = sin(πx)/(πx)``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x) * (1 + 0.5 * torch.sinc(x))


class GMTU(nn.Module):
    """``tanh(1.5x)·exp(-0.2x²) + 0.2x``, found by evolutionary search (docs/method.md §4)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(1.5 * x) * torch.exp(-0.2 * x.square()) + 0.2 * x


def _leaky_relu(negative_slope: float = 0.01) -> nn.Module:
    return nn.LeakyReLU(negative_slope=negative_slope)


def _slope(module: nn.Module) -> float:
    return float(getattr(module, "negative_slope", 0.01))


def _step(module: nn.Module, x: Tensor) -> Tensor:
    return (x > 0).to(x.dtype)


def _leaky_step(module: nn.Module, x: Tensor) -> Tensor:
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, _slope(module)))


def _ones(module: nn.Module, x: Tensor) -> Tensor:
    return torch.ones_like(x)


def _sigmoid_pair(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    value = torch.sigmoid(x)
    return value, value * (1 - value)


def _tanh_pair(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    value = torch.tanh(x)
    return value, 1 - value.square()


# The paper's five: closed forms for the regularizer and rows over the basis
# (relu(x), x, σ(x), σ(2x), 1) for the closed-form mixture (tanh(x) = 2σ(2x) − 1).
register_activation(
    "relu", derivative=_step, value_and_derivative=lambda m, x: (torch.relu(x), _step(m, x)),
    basis=lambda m: (1.0, 0.0, 0.0, 0.0, 0.0)
)(nn.ReLU)
register_activation(
    "sigmoid", value_and_derivative=_sigmoid_pair, basis=lambda m: (0.0, 0.0, 1.0, 0.0, 0.0)
)(nn.Sigmoid)
register_activation(
    "tanh", value_and_derivative=_tanh_pair, basis=lambda m: (0.0, 0.0, 0.0, 2.0, -1.0)
)(nn.Tanh)
register_activation(
    "leaky_relu", module_type=nn.LeakyReLU, derivative=_leaky_step,
    value_and_derivative=lambda m, x: (F.leaky_relu(x, _slope(m)), _leaky_step(m, x)),
    basis=lambda m: (1.0 - _slope(m), _slope(m), 0.0, 0.0, 0.0)
)(_leaky_relu)
register_activation(
    "identity", derivative=_ones, value_and_derivative=lambda m, x: (x.clone(), _ones(m, x)),
    basis=lambda m: (0.0, 1.0, 0.0, 0.0, 0.0)
)(nn.Identity)

for _name, _kind in (("gelu", nn.GELU), ("silu", nn.SiLU), ("elu", nn.ELU), ("selu", nn.SELU),
                     ("softplus", nn.Softplus), ("mish", nn.Mish)):
    register_activation(_name)(_kind)
for _name, _factory in (
    ("prelu", nn.PReLU),
    ("swish_beta", SwishBeta),
    ("adaptive_gumbel", AdaptiveGumbel),
    ("adaptive_relu", AdaptiveReLU),
    ("gelu_sine", GELUSine),
    ("gelu_sinc", GELUSinc),
    ("gmtu", GMTU),
):
    register_activation(_name)(_factory)
del _name, _kind, _factory
