"""Tests for the candidate registry and the activation modules (flexact.nn.activations)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import flexact
from flexact import ConfigError, FlexAct, available_activations, get_activation
from flexact.nn.registry import _REGISTRY, activation_derivative, register_activation

from .conftest import OTHER_BUILTINS, PAPER_FIVE

EXTREME_INPUTS = (-1e4, -100.0, -10.0, -1.0, 0.0, 1.0, 10.0, 100.0, 1e4)


def _away_from_zero(n: int, dtype: torch.dtype, seed: int = 0) -> Tensor:
    """``n`` values with ``0.1 <= |x| <= 3`` and random signs (clear of the ReLU kinks)."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = 0.1 + 2.9 * torch.rand(n, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    return (sign * magnitude).to(dtype)


def _autograd_derivative(module: nn.Module, x: Tensor) -> Tensor:
    xg = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(module(xg).sum(), xg)
    return grad


def _gelu_exact(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _shape_of(module: nn.Module) -> float:
    """The (scalar) positive shape α of an adaptive activation, from its raw parameter."""
    return torch.nn.functional.softplus(module.raw_shape).item()


def _param_grads_finite(module: nn.Module) -> bool:
    return all(
        p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in module.parameters()
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_starts_with_paper_five_in_order() -> None:
    names = available_activations()
    assert tuple(names[:5]) == PAPER_FIVE
    assert flexact.PAPER_CANDIDATES == PAPER_FIVE


def test_registry_includes_builtins() -> None:
    names = available_activations()
    missing = [n for n in OTHER_BUILTINS if n not in names]
    assert not missing, f"missing built-ins: {missing}"
    assert len(names) == len(set(names))


def test_available_activations_returns_a_copy() -> None:
    names = available_activations()
    names.append("not_registered_anywhere")
    assert "not_registered_anywhere" not in available_activations()


@pytest.mark.parametrize("name", available_activations())
def test_get_activation_builds_fresh_modules(name: str) -> None:
    first, second = get_activation(name), get_activation(name)
    assert isinstance(first, nn.Module)
    assert first is not second
    for p1, p2 in zip(first.parameters(), second.parameters(), strict=True):
        assert p1.data_ptr() != p2.data_ptr()


def test_leaky_relu_slope_is_one_hundredth() -> None:
    module = get_activation("leaky_relu")
    assert module.negative_slope == 0.01
    out = module(torch.tensor([-2.0, 3.0], dtype=torch.float64))
    assert out.tolist() == [-0.02, 3.0]


def test_get_activation_passes_kwargs() -> None:
    module = get_activation("leaky_relu", negative_slope=0.2)
    assert module(torch.tensor([-1.0])).item() == pytest.approx(-0.2)
    prelu = get_activation("prelu", num_parameters=3, init=0.5)
    assert prelu.weight.shape == (3,)
    assert torch.all(prelu.weight == 0.5)


class _Cube(nn.Module):
    """x³: parameter-free, not in the closed-form derivative table (autograd fallback)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * x * x


@pytest.fixture
def cube_name() -> Iterator[str]:
    name = "flexact_test_cube_act"
    assert name not in _REGISTRY
    register_activation(name)(_Cube)
    try:
        yield name
    finally:
        _REGISTRY.pop(name, None)


def test_user_registered_activation_is_listed_and_built(cube_name: str) -> None:
    assert cube_name in available_activations()
    assert isinstance(get_activation(cube_name), _Cube)


def test_register_activation_returns_factory_and_overwrite(cube_name: str) -> None:
    class _Other(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return -x

    with pytest.raises(ConfigError, match="already registered"):
        register_activation(cube_name)(_Other)
    assert isinstance(get_activation(cube_name), _Cube)
    returned = register_activation(cube_name, overwrite=True)(_Other)
    assert returned is _Other
    assert isinstance(get_activation(cube_name), _Other)


def test_user_registered_activation_works_as_flexact_candidate(cube_name: str) -> None:
    torch.manual_seed(0)
    layer = FlexAct(candidates=[cube_name, "relu"])
    x = _away_from_zero(32, torch.float32, seed=1).reshape(8, 4).requires_grad_(True)
    out = layer(x)
    out.sum().backward()
    assert out.shape == x.shape
    assert layer.logits.grad is not None and torch.isfinite(layer.logits.grad).all()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # The regularizer differentiates the custom candidate by autograd: d(x³)/dx = 3x².
    norms = layer.gradient_norms(x.detach())
    expected_cube = (3 * x.detach() ** 2).norm(dim=1).mean()
    torch.testing.assert_close(norms[0], expected_cube)
    # In eval (argmax) the layer is exactly the custom activation once it has the top logit.
    with torch.no_grad():
        layer.logits.copy_(torch.tensor([2.0, -1.0]))
    layer.eval()
    assert layer.selected() == [cube_name]
    assert torch.equal(layer(x.detach()), _Cube()(x.detach()))


def test_get_activation_rejects_factory_returning_non_module() -> None:
    name = "flexact_test_not_a_module"
    register_activation(name)(lambda: "nope")
    try:
        with pytest.raises(TypeError, match=r"not an nn\.Module"):
            get_activation(name)
    finally:
        _REGISTRY.pop(name, None)


def test_get_activation_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="unknown activation 'nope'") as info:
        get_activation("nope")
    message = str(info.value)
    for name in ("relu", "sigmoid", "gmtu"):
        assert name in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", ["Bad-Name", "Relu", "1relu", "", "my act", "_private"])
def test_register_activation_rejects_malformed_names(bad: str) -> None:
    with pytest.raises(ConfigError, match="snake_case"):
        register_activation(bad)
    assert bad not in _REGISTRY


def test_register_activation_rejects_duplicate_builtin() -> None:
    with pytest.raises(ConfigError, match="'relu' is already registered"):
        register_activation("relu")(nn.Tanh)
    assert isinstance(get_activation("relu"), nn.ReLU)


@pytest.mark.parametrize("cls_name", ["swish_beta", "adaptive_gumbel", "adaptive_relu"])
def test_parameterized_activations_reject_bad_num_parameters(cls_name: str) -> None:
    with pytest.raises(ConfigError, match="num_parameters"):
        get_activation(cls_name, num_parameters=0)


@pytest.mark.parametrize("cls_name", ["adaptive_gumbel", "adaptive_relu"])
@pytest.mark.parametrize("init", [0.0, -1.0, 1e4])
def test_shape_activations_reject_out_of_range_init(cls_name: str, init: float) -> None:
    with pytest.raises(ConfigError, match="init must lie in"):
        get_activation(cls_name, init=init)


# --------------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------------


def test_adaptive_gumbel_at_alpha_one_is_sigmoid() -> None:
    module = get_activation("adaptive_gumbel", init=1.0)
    x = torch.linspace(-30.0, 30.0, 601)
    torch.testing.assert_close(module(x), torch.sigmoid(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", [0.05, 0.5, 2.0, 7.0])
def test_adaptive_gumbel_matches_formula(init: float) -> None:
    module = get_activation("adaptive_gumbel", init=init).double()
    alpha = _shape_of(module)
    # The raw parameter is stored in float32, so α is init only up to float32 rounding.
    assert alpha == pytest.approx(init, rel=1e-6)
    x = torch.linspace(-6.0, 6.0, 121, dtype=torch.float64)
    expected = 1.0 - (1.0 + alpha * torch.exp(x)) ** (-1.0 / alpha)
    torch.testing.assert_close(module(x), expected, rtol=1e-9, atol=1e-12)


def test_adaptive_relu_matches_formula() -> None:
    module = get_activation("adaptive_relu", init=1.7).double()
    alpha = _shape_of(module)
    assert alpha == pytest.approx(1.7, rel=1e-6)
    x = torch.linspace(-5.0, 5.0, 101, dtype=torch.float64)
    expected = torch.where(x > 0, x * (1.0 - torch.exp(-alpha * x)), torch.zeros_like(x))
    torch.testing.assert_close(module(x), expected, rtol=1e-9, atol=1e-12)


def test_adaptive_relu_with_large_alpha_approaches_relu() -> None:
    alpha = 1000.0
    module = get_activation("adaptive_relu", init=alpha)
    x = torch.linspace(-3.0, 3.0, 6001)
    gap = (torch.relu(x) - module(x)).abs().max().item()
    # max_x x·e^(-αx) = 1/(αe), attained at x = 1/α.
    assert gap <= 1.0 / (alpha * math.e) + 1e-6
    far = x.abs() >= 0.05
    torch.testing.assert_close(module(x)[far], torch.relu(x)[far])
    # And a small α is clearly not ReLU (the check above can fail).
    small = get_activation("adaptive_relu", init=1.0)
    assert (torch.relu(x) - small(x)).abs().max().item() > 0.1


def test_per_unit_shape_parameters_broadcast_along_dim_one() -> None:
    module = get_activation("adaptive_gumbel", num_parameters=3).double()
    alphas = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64)
    with torch.no_grad():
        module.raw_shape.copy_(alphas + torch.log(-torch.expm1(-alphas)))  # inverse softplus
    x = torch.linspace(-4.0, 4.0, 2 * 3 * 5, dtype=torch.float64).reshape(2, 3, 5)
    out = module(x)
    for c, alpha in enumerate(alphas.tolist()):
        expected = 1.0 - (1.0 + alpha * torch.exp(x[:, c])) ** (-1.0 / alpha)
        torch.testing.assert_close(out[:, c], expected, rtol=1e-9, atol=1e-12)


def test_swish_beta_matches_formula_per_channel() -> None:
    module = get_activation("swish_beta", num_parameters=2).double()
    with torch.no_grad():
        module.beta.copy_(torch.tensor([0.5, 3.0]))
    x = torch.linspace(-4.0, 4.0, 12, dtype=torch.float64).reshape(3, 2, 2)
    out = module(x)
    for c, beta in enumerate((0.5, 3.0)):
        torch.testing.assert_close(out[:, c], x[:, c] * torch.sigmoid(beta * x[:, c]))


def test_prelu_default_init() -> None:
    module = get_activation("prelu")
    assert module(torch.tensor([-4.0, 2.0])).tolist() == [-1.0, 2.0]


def test_gelu_sine_formula() -> None:
    x = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)
    expected = _gelu_exact(x) + 0.1 * torch.sin(x)
    torch.testing.assert_close(get_activation("gelu_sine")(x), expected)


def test_gelu_sinc_formula() -> None:
    x = torch.linspace(-8.0, 8.0, 162, dtype=torch.float64)  # even count: 0 is not a grid point
    sinc = torch.sin(math.pi * x) / (math.pi * x)
    expected = _gelu_exact(x) * (1.0 + 0.5 * sinc)
    torch.testing.assert_close(get_activation("gelu_sinc")(x), expected)
    # sinc(0) = 1 (normalized), so the value at 0 is GELU(0)·1.5 = 0 with derivative 0.75.
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    get_activation("gelu_sinc")(zero).sum().backward()
    torch.testing.assert_close(zero.grad, torch.tensor([0.75], dtype=torch.float64))
    # Normalized sinc vanishes at nonzero integers: there the activation is plain GELU.
    ints = torch.tensor([-3.0, -1.0, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(get_activation("gelu_sinc")(ints), _gelu_exact(ints))


def test_gmtu_formula() -> None:
    x = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)
    expected = torch.tanh(1.5 * x) * torch.exp(-0.2 * x * x) + 0.2 * x
    torch.testing.assert_close(get_activation("gmtu")(x), expected)


# --------------------------------------------------------------------------------------------
# Closed-form derivatives
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64],
    ids=["float32", "float64"],
)
@pytest.mark.parametrize("name", PAPER_FIVE)
def test_activation_derivative_closed_forms_match_autograd(
    name: str, dtype: torch.dtype
) -> None:
    module = get_activation(name).to(dtype)
    x = _away_from_zero(200, dtype, seed=3)
    closed = activation_derivative(module, x)
    assert closed.dtype == dtype and closed.shape == x.shape
    assert not closed.requires_grad
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(closed, _autograd_derivative(module, x), rtol=tol, atol=tol)


@pytest.mark.parametrize("slope", [0.2, 0.01])
def test_activation_derivative_leaky_custom_slope(slope: float) -> None:
    module = get_activation("leaky_relu", negative_slope=slope)
    x = torch.tensor([-3.0, -0.5, 0.5, 3.0])
    torch.testing.assert_close(
        activation_derivative(module, x), torch.tensor([slope, slope, 1.0, 1.0])
    )


@pytest.mark.parametrize("name", ["gelu", "mish", "gmtu", "adaptive_gumbel", "swish_beta"])
def test_activation_derivative_autograd_fallback(name: str) -> None:
    module = get_activation(name).double()
    x = _away_from_zero(50, torch.float64, seed=4)
    with torch.no_grad():  # must still differentiate under no_grad (the regularizer's context)
        d = activation_derivative(module, x)
    torch.testing.assert_close(d, _autograd_derivative(module, x))


def test_activation_derivative_gmtu_analytic() -> None:
    module = get_activation("gmtu")
    x = torch.linspace(-4.0, 4.0, 81, dtype=torch.float64)
    t = torch.tanh(1.5 * x)
    e = torch.exp(-0.2 * x * x)
    expected = 1.5 * (1 - t * t) * e + t * e * (-0.4 * x) + 0.2
    torch.testing.assert_close(activation_derivative(module, x), expected)


# --------------------------------------------------------------------------------------------
# Numerical safety
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", available_activations())
def test_registry_entry_finite_at_extreme_inputs_float32(name: str) -> None:
    module = get_activation(name)
    x = torch.tensor(EXTREME_INPUTS, requires_grad=True)
    y = module(x)
    y.sum().backward()
    assert torch.isfinite(y).all(), y
    assert x.grad is not None and torch.isfinite(x.grad).all(), x.grad
    assert _param_grads_finite(module)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["f32in", "bf16in"])
@pytest.mark.parametrize("name", available_activations())
def test_registry_entry_finite_under_bf16_autocast(name: str, input_dtype: torch.dtype) -> None:
    module = get_activation(name)
    x = torch.tensor(EXTREME_INPUTS, dtype=input_dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    y.float().sum().backward()
    assert torch.isfinite(y).all(), y
    assert x.grad is not None and torch.isfinite(x.grad).all(), x.grad
    assert _param_grads_finite(module)


@pytest.mark.parametrize("name", available_activations())
def test_registry_entry_finite_after_bf16_linear(name: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(1, 1)
    with torch.no_grad():
        linear.weight.fill_(1.0)
        linear.bias.zero_()
    module = get_activation(name)
    x = torch.tensor(EXTREME_INPUTS).unsqueeze(1).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = linear(x)
        assert h.dtype == torch.bfloat16
        y = module(h)
    y.float().sum().backward()
    assert torch.isfinite(y).all(), y
    assert x.grad is not None and torch.isfinite(x.grad).all(), x.grad
    assert torch.isfinite(linear.weight.grad).all()
    assert _param_grads_finite(module)
