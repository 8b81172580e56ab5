"""The candidate registry: activation names mapped to module factories.

Every candidate is an element-wise ``nn.Module``. Names are lower-case snake_case. The paper's
five candidates come first, in the paper's order, and form :data:`PAPER_CANDIDATES`.

Users add their own with :func:`register_activation`::

    @register_activation("squareplus")
    class Squareplus(nn.Module):
        def forward(self, x):
            return 0.5 * (x + torch.sqrt(x * x + 4))

Candidates never run in place: a FlexAct layer feeds one input to all of them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexact.errors import ConfigError

__all__ = [
    "GMTU",
    "PAPER_CANDIDATES",
    "AdaptiveGumbel",
    "AdaptiveReLU",
    "GELUSinc",
    "GELUSine",
    "SwishBeta",
    "activation_derivative",
    "activation_value_and_derivative",
    "available_activations",
    "get_activation",
    "has_parameters",
    "is_activation_module",
    "register_activation",
]

PAPER_CANDIDATES: tuple[str, ...] = ("relu", "sigmoid", "tanh", "leaky_relu", "identity")
"""The FlexAct paper's candidate set, in its order."""

FactoryT = TypeVar("FactoryT", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


def register_activation(name: str, *, overwrite: bool = False) -> Callable[[FactoryT], FactoryT]:
    """Register an activation factory (a module class or a function returning a module).

    Args:
        name: Lower-case snake_case name under which configs refer to the activation.
        overwrite: Replace an existing entry of the same name instead of raising.

    Returns:
        A decorator that registers its argument and returns it unchanged.

    Raises:
        ConfigError: If the name is malformed, or taken and ``overwrite`` is false.
    """
    if not _NAME_PATTERN.match(name):
        raise ConfigError(
            f"activation name {name!r} is not lower-case snake_case (e.g. 'my_act'); rename it"
        )

    def decorator(factory: FactoryT) -> FactoryT:
        if name in _REGISTRY and not overwrite:
            raise ConfigError(
                f"activation {name!r} is already registered; pick another name or pass "
                "overwrite=True"
            )
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_activations() -> list[str]:
    """Names of all registered activations, built-ins first in registration order."""
    return list(_REGISTRY)


def check_activation_name(name: str) -> str:
    """Return ``name`` if registered, else raise a :class:`ConfigError` listing valid names."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown activation {name!r}; valid names are: {', '.join(_REGISTRY)} "
            "(register new ones with flexact.register_activation)"
        )
    return name


def get_activation(name: str, **kwargs: object) -> nn.Module:
    """Build a fresh activation module by registry name.

    Args:
        name: A name from :func:`available_activations`.
        **kwargs: Passed to the registered factory (e.g. ``negative_slope`` for ``leaky_relu``).

    Returns:
        A new ``nn.Module`` instance.

    Raises:
        ConfigError: If ``name`` is not registered (the message lists the valid names).
    """
    module = _REGISTRY[check_activation_name(name)](**kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"the factory registered as {name!r} returned {type(module).__name__}, "
                        "not an nn.Module")
    return module


def is_activation_module(module: nn.Module) -> bool:
    """Whether ``module`` is an instance of a registered activation class.

    Used to exempt activation shape parameters (PReLU slopes, adaptive α, Swish β) from weight
    decay.
    """
    classes = tuple(f for f in _REGISTRY.values() if isinstance(f, type))
    return isinstance(module, classes)


def has_parameters(module: nn.Module) -> bool:
    """Whether a module owns any parameter (such candidates take the general autograd path)."""
    return any(True for _ in module.parameters())


def _leaky_slope(module: nn.Module) -> float:
    return float(getattr(module, "negative_slope", 0.01))


def _leaky_derivative(module: nn.Module, x: Tensor) -> Tensor:
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, _leaky_slope(module)))


def _sigmoid_pair(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    value = torch.sigmoid(x)
    return value, value * (1 - value)


def _tanh_pair(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    value = torch.tanh(x)
    return value, 1 - value.square()


# Closed forms (value, derivative) of the hot candidates, each from one evaluation; everything
# else is differentiated by autograd.
_PAIRS: dict[type, Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]] = {
    nn.ReLU: lambda m, x: (torch.relu(x), (x > 0).to(x.dtype)),
    nn.Sigmoid: _sigmoid_pair,
    nn.Tanh: _tanh_pair,
    nn.LeakyReLU: lambda m, x: (F.leaky_relu(x, _leaky_slope(m)), _leaky_derivative(m, x)),
    nn.Identity: lambda m, x: (x.clone(), torch.ones_like(x)),
}


# Derivatives that need no evaluation of the activation itself.
_DERIVATIVES: dict[type, Callable[[nn.Module, Tensor], Tensor]] = {
    nn.ReLU: lambda m, x: (x > 0).to(x.dtype),
    nn.LeakyReLU: lambda m, x: _leaky_derivative(m, x),
    nn.Identity: lambda m, x: torch.ones_like(x),
}


def activation_value_and_derivative(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(σ(x), σ'(x))`` as new tensors (safe to modify in place), with no graph kept.

    Args:
        module: An element-wise activation module.
        x: Input.
    """
    pair = _PAIRS.get(type(module))
    if pair is not None:
        return pair(module, x)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = module(xg)
        (grad,) = torch.autograd.grad(y, xg, torch.ones_like(y))
    value = y.detach()
    if value.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        value = value.clone()  # a pass-through activation: never hand out the input itself
    return value, grad


def activation_derivative(module: nn.Module, x: Tensor) -> Tensor:
    """Element-wise derivative ``dσ/dx`` of an activation at ``x`` (no graph is kept).

    Args:
        module: An element-wise activation module.
        x: Input at which to differentiate.

    Returns:
        A tensor shaped like ``x``.
    """
    derivative_only = _DERIVATIVES.get(type(module))
    if derivative_only is not None:
        return derivative_only(module, x)
    return activation_value_and_derivative(module, x)[1]


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
    """``GELU(x) + 0.1·sin(x)``, found by evolutionary search (METHOD.md §4)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x) + 0.1 * torch.sin(x)


class GELUSinc(nn.Module):
    """``GELU(x)·(1 + 0.5·sinc(x))`` with the normalized ``sinc(x) = sin(πx)/(πx)``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x) * (1 + 0.5 * torch.sinc(x))


class GMTU(nn.Module):
    """``tanh(1.5x)·exp(-0.2x²) + 0.2x``, found by evolutionary search (METHOD.md §4)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(1.5 * x) * torch.exp(-0.2 * x.square()) + 0.2 * x


def _leaky_relu(negative_slope: float = 0.01) -> nn.Module:
    return nn.LeakyReLU(negative_slope=negative_slope)


for _name, _factory in (
    ("relu", nn.ReLU),
    ("sigmoid", nn.Sigmoid),
    ("tanh", nn.Tanh),
    ("leaky_relu", _leaky_relu),
    ("identity", nn.Identity),
    ("gelu", nn.GELU),
    ("silu", nn.SiLU),
    ("elu", nn.ELU),
    ("selu", nn.SELU),
    ("softplus", nn.Softplus),
    ("mish", nn.Mish),
    ("prelu", nn.PReLU),
    ("swish_beta", SwishBeta),
    ("adaptive_gumbel", AdaptiveGumbel),
    ("adaptive_relu", AdaptiveReLU),
    ("gelu_sine", GELUSine),
    ("gelu_sinc", GELUSinc),
    ("gmtu", GMTU),
):
    register_activation(_name)(_factory)
del _name, _factory
