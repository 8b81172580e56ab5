"""The candidate registry: one :class:`Candidate` spec per activation name.

A spec holds everything flexact knows about a candidate: how to build it, and optionally its
closed forms (derivative, value and derivative from one evaluation, coefficients over the
closed-form basis of :mod:`flexact.nn.kernels`) and its flexact-free module for export. The
mixture kernels, the regularizer and :func:`flexact.freeze_selection` look these up here, so a
new candidate, built in or registered by a user, is described in one place::

    def squareplus_slope(module, x):
        return 0.5 * (1 + x / torch.sqrt(x * x + 4))

    @register_activation("squareplus", derivative=squareplus_slope)
    class Squareplus(nn.Module):
        def forward(self, x):
            return 0.5 * (x + torch.sqrt(x * x + 4))

Candidates never run in place: a FlexAct layer feeds one input to all of them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from flexact.errors import ConfigError
from flexact.nn.expressions import Expression, is_expression, parse

__all__ = [
    "Candidate",
    "activation_derivative",
    "activation_value_and_derivative",
    "available_activations",
    "basis_row",
    "candidate_for",
    "check_activation_name",
    "get_activation",
    "has_parameters",
    "is_activation_module",
    "plain_module",
    "register_activation",
]

FactoryT = TypeVar("FactoryT", bound=Callable[..., nn.Module])
Derivative = Callable[[nn.Module, Tensor], Tensor]
ValueAndDerivative = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]
BasisRow = Callable[[nn.Module], tuple[float, float, float, float, float]]

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Candidate:
    """What flexact knows about one candidate activation.

    Attributes:
        name: Registry name (lower-case snake_case).
        factory: Builds the module (a class, or a function returning a module).
        module_type: The exact class of the modules ``factory`` builds; the closed forms below
            apply to modules of exactly this class (a subclass may override ``forward``).
        derivative: ``σ'(x)`` without evaluating ``σ`` (e.g. ReLU's step), or ``None``.
        value_and_derivative: ``(σ(x), σ'(x))`` from one evaluation, or ``None`` (autograd).
        basis: The module's coefficients over :data:`flexact.nn.kernels.BASIS`
            (``relu(x), x, σ(x), σ(2x), 1``), or ``None`` if it is no such combination.
        plain: A flexact-free copy of a module (``torch.nn`` classes), for export, or ``None``
            (a deep copy, which keeps learned shape parameters).
    """

    name: str
    factory: Callable[..., nn.Module]
    module_type: type | None = None
    derivative: Derivative | None = None
    value_and_derivative: ValueAndDerivative | None = None
    basis: BasisRow | None = None
    plain: Callable[[nn.Module], nn.Module] | None = None


_REGISTRY: dict[str, Candidate] = {}


def register_activation(
    name: str,
    *,
    overwrite: bool = False,
    module_type: type | None = None,
    derivative: Derivative | None = None,
    value_and_derivative: ValueAndDerivative | None = None,
    basis: BasisRow | None = None,
    plain: Callable[[nn.Module], nn.Module] | None = None,
) -> Callable[[FactoryT], FactoryT]:
    """Register an activation factory (a module class or a function returning a module).

    Args:
        name: Lower-case snake_case name under which configs refer to the activation.
        overwrite: Replace an existing entry of the same name instead of raising.
        module_type: Exact class of the built modules (default: the factory, if a class).
        derivative: Optional closed-form ``σ'(x)`` (``(module, x) -> Tensor``); saves the
            regularizer an autograd pass per candidate.
        value_and_derivative: Optional ``(module, x) -> (σ(x), σ'(x))`` from one evaluation.
        basis: Optional ``module -> (c_relu, c_x, c_σ, c_σ2x, c_1)``: the activation equals
            that combination of ``relu(x), x, σ(x), σ(2x), 1``; such candidates take the
            closed-form mixture.
        plain: Optional ``module -> nn.Module`` giving the flexact-free module for export.

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
        kind = module_type if module_type is not None else (
            factory if isinstance(factory, type) else None)
        _REGISTRY[name] = Candidate(name, factory, kind, derivative, value_and_derivative,
                                    basis, plain)
        return factory

    return decorator


def available_activations() -> list[str]:
    """Names of all registered activations, built-ins first in registration order."""
    return list(_REGISTRY)


def check_activation_name(name: str) -> str:
    """Return ``name`` if registered or a well-formed expression, else raise a ConfigError.

    Expressions such as ``"add(tanh(x),sin(x))"`` (:mod:`flexact.nn.expressions`) are accepted
    wherever a registry name is; a malformed one raises naming its bad token.
    """
    if name not in _REGISTRY:
        if is_expression(name):
            parse(name)
            return name
        raise ConfigError(
            f"unknown activation {name!r}; valid names are: {', '.join(_REGISTRY)} "
            "(register new ones with flexact.register_activation), or an expression such as "
            "'add(tanh(x),sin(x))'"
        )
    return name


def get_activation(name: str, **kwargs: object) -> nn.Module:
    """Build a fresh activation module by registry name.

    Args:
        name: A name from :func:`available_activations`, or an expression.
        **kwargs: Passed to the registered factory (e.g. ``negative_slope`` for ``leaky_relu``).

    Returns:
        A new ``nn.Module`` instance.

    Raises:
        ConfigError: If ``name`` is not registered (the message lists the valid names).
    """
    if name not in _REGISTRY and is_expression(name):
        if kwargs:
            raise ConfigError(f"expression {name!r} takes no keyword arguments, got "
                              f"{sorted(kwargs)}; write constants into the expression")
        return Expression(name)
    module = _REGISTRY[check_activation_name(name)].factory(**kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"the factory registered as {name!r} returned {type(module).__name__}, "
                        "not an nn.Module")
    return module


def candidate_for(module: nn.Module) -> Candidate | None:
    """The spec whose ``module_type`` is exactly ``type(module)`` (first registered wins)."""
    kind = type(module)
    for spec in _REGISTRY.values():
        if spec.module_type is kind:
            return spec
    return None


def is_activation_module(module: nn.Module) -> bool:
    """Whether ``module`` is an instance of a registered activation class.

    Used to exempt activation shape parameters (PReLU slopes, adaptive α, Swish β) from weight
    decay.
    """
    classes = tuple(s.module_type for s in _REGISTRY.values() if s.module_type is not None)
    return isinstance(module, classes)


def has_parameters(module: nn.Module) -> bool:
    """Whether a module owns any parameter (such candidates take the general autograd path)."""
    return any(True for _ in module.parameters())


def activation_value_and_derivative(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(σ(x), σ'(x))`` as new tensors (safe to modify in place), with no graph kept.

    Args:
        module: An element-wise activation module.
        x: Input.
    """
    spec = candidate_for(module)
    if spec is not None and spec.value_and_derivative is not None:
        return spec.value_and_derivative(module, x)
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
    spec = candidate_for(module)
    if spec is not None and spec.derivative is not None:
        return spec.derivative(module, x)
    return activation_value_and_derivative(module, x)[1]


def basis_row(module: nn.Module) -> tuple[float, float, float, float, float] | None:
    """The module's coefficients over the closed-form basis, or ``None`` if it has none."""
    spec = candidate_for(module)
    return None if spec is None or spec.basis is None else spec.basis(module)


def plain_module(module: nn.Module) -> nn.Module:
    """A flexact-free copy of a candidate module (``torch.nn`` class where one exists)."""
    spec = candidate_for(module)
    if spec is not None and spec.plain is not None:
        return spec.plain(module)
    return copy.deepcopy(module)  # registry module (keeps learned shape parameters)
