"""Tests for the FlexAct layer, the fused mixture and the selection regularizer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import flexact
from flexact import (
    PAPER_CANDIDATES,
    ConfigError,
    FlexAct,
    FlexActHead,
    flexact_layers,
    get_activation,
    mixture,
    selection_kl,
)
from flexact.tools.profiling import kernel_count, saved_bytes

from .conftest import OTHER_BUILTINS

# 0.999 quantile of the chi-square distribution with 4 degrees of freedom (scipy.stats.chi2.ppf
# (0.999, 4) = 18.4668...; hard-coded because scipy is not a dependency).
CHI2_4DOF_Q999 = 18.467
PARAMETERIZED = ("prelu", "swish_beta", "adaptive_gumbel", "adaptive_relu")

_BUILTINS = (*PAPER_CANDIDATES, *OTHER_BUILTINS)


def _away_from_zero(shape: Sequence[int], dtype: torch.dtype, seed: int) -> Tensor:
    """Random values with ``0.2 <= |x| <= 2.5`` (clear of the ReLU/leaky/PReLU kinks)."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = 0.2 + 2.3 * torch.rand(*shape, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(*shape, generator=gen, dtype=torch.float64) < 0.5, -1, 1)
    return (sign * magnitude).to(dtype)


def _naive_mixture(
    x: Tensor, weights: Tensor, candidates: Sequence[nn.Module], channel_dim: int | None
) -> Tensor:
    """Reference ``Σⱼ wⱼ σⱼ(x)`` written with plain autograd ops."""
    out = torch.zeros_like(x)
    for j, act in enumerate(candidates):
        if channel_dim is None:
            w = weights[j]
        else:
            shape = [1] * x.dim()
            shape[channel_dim] = -1
            w = weights[:, j].reshape(shape)
        out = out + w * act(x)
    return out


def _softmax_list(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(target: Sequence[float], probs: Sequence[float]) -> float:
    return sum(t * math.log(t / p) for t, p in zip(target, probs, strict=True) if t > 0)


def _set_logits(layer: FlexAct, logits: Sequence[float] | Sequence[Sequence[float]]) -> None:
    with torch.no_grad():
        layer.logits.copy_(torch.tensor(logits, dtype=layer.logits.dtype))


class _MixtureModule(nn.Module):
    """Holds candidates so functional_call can feed their parameters to gradcheck."""

    def __init__(self, candidates: Sequence[nn.Module], channel_dim: int | None) -> None:
        super().__init__()
        self.cands = nn.ModuleList(candidates)
        self.channel_dim = channel_dim

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        return mixture(x, weights, self.cands, self.channel_dim)


# channel_dim (None: per-layer weights), x shape, number of channels (None: per-layer)
GRANULARITIES = [
    pytest.param(None, (5, 4), None, id="layer"),
    pytest.param(1, (4, 3, 3), 3, id="channel_dim1"),
    pytest.param(-1, (2, 5, 3), 3, id="channel_last"),
]


# --------------------------------------------------------------------------------------------
# mixture: values and gradcheck
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "path"),
    [
        pytest.param(PAPER_CANDIDATES, "ClosedFormMixture", id="paper_five"),
        pytest.param(("tanh", "relu"), "ClosedFormMixture", id="closed_form_subset"),
        pytest.param(("sigmoid", "gelu"), "FusedMixture", id="one_without_closed_form"),
        pytest.param(
            ("gelu", "silu", "elu", "selu", "softplus", "mish", "gelu_sine", "gelu_sinc", "gmtu"),
            "FusedMixture",
            id="autograd_fallback",
        ),
    ],
)
@pytest.mark.parametrize(("channel_dim", "shape", "channels"), GRANULARITIES)
def test_mixture_fused_path_gradcheck(
    names: Sequence[str], path: str, channel_dim: int | None, shape: tuple[int, ...],
    channels: int | None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flexact.nn.kernels, "SMALL_INPUT", 0)  # the fused path, however small
    candidates = [get_activation(n).double() for n in names]
    x = _away_from_zero(shape, torch.float64, seed=1).requires_grad_(True)
    w_shape = (len(names),) if channels is None else (channels, len(names))
    torch.manual_seed(2)
    weights = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)

    out = mixture(x, weights, candidates, channel_dim)
    assert path in type(out.grad_fn).__name__  # this really is the path under test
    cd = None if channel_dim is None else channel_dim % x.dim()
    torch.testing.assert_close(out, _naive_mixture(x, weights, candidates, cd))
    assert torch.autograd.gradcheck(
        lambda xx, ww: mixture(xx, ww, candidates, channel_dim), (x, weights)
    )


@pytest.mark.parametrize(("channel_dim", "shape", "channels"), GRANULARITIES)
def test_small_inputs_take_plain_autograd_with_the_same_values_and_gradients(
    channel_dim: int | None, shape: tuple[int, ...], channels: int | None
) -> None:
    candidates = [get_activation(n).double() for n in PAPER_CANDIDATES]
    x = _away_from_zero(shape, torch.float64, seed=1).requires_grad_(True)
    w_shape = (5,) if channels is None else (channels, 5)
    weights = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)
    assert x.numel() <= flexact.nn.kernels.SMALL_INPUT
    out = mixture(x, weights, candidates, channel_dim)
    assert "ClosedFormMixture" not in type(out.grad_fn).__name__
    cd = None if channel_dim is None else channel_dim % x.dim()
    torch.testing.assert_close(out, _naive_mixture(x, weights, candidates, cd))
    assert torch.autograd.gradcheck(
        lambda xx, ww: mixture(xx, ww, candidates, channel_dim), (x, weights)
    )
    big = _away_from_zero((flexact.nn.kernels.SMALL_INPUT + 1,), torch.float64, seed=2)
    weights = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert "ClosedFormMixture" in type(mixture(big, weights, candidates).grad_fn).__name__


@pytest.mark.parametrize(
    "names",
    [
        pytest.param(("relu", *PARAMETERIZED), id="free_first"),
        pytest.param(("prelu", "tanh", "swish_beta", "leaky_relu", "adaptive_gumbel"), id="mixed"),
        pytest.param(("adaptive_relu",), id="single_learned"),
    ],
)
@pytest.mark.parametrize(("channel_dim", "shape", "channels"), GRANULARITIES)
def test_mixture_general_path_gradcheck(
    names: Sequence[str], channel_dim: int | None, shape: tuple[int, ...], channels: int | None
) -> None:
    per_unit = channels if channel_dim == 1 else 1
    torch.manual_seed(3)
    candidates = []
    for n in names:
        kwargs = {"num_parameters": per_unit} if n in PARAMETERIZED else {}
        act = get_activation(n, **kwargs).double()
        with torch.no_grad():  # distinct, non-default per-unit parameter values
            for p in act.parameters():
                p.add_(0.3 * torch.rand_like(p))
        candidates.append(act)
    module = _MixtureModule(candidates, channel_dim)
    names_params = [
        (k, v.detach().clone().requires_grad_(True)) for k, v in module.named_parameters()
    ]
    assert names_params, "the general path needs candidates with parameters"
    keys = [k for k, _ in names_params]

    x = _away_from_zero(shape, torch.float64, seed=4).requires_grad_(True)
    w_shape = (len(names),) if channels is None else (channels, len(names))
    weights = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)

    cd = None if channel_dim is None else channel_dim % x.dim()
    torch.testing.assert_close(module(x, weights), _naive_mixture(x, weights, candidates, cd))

    def fn(xx: Tensor, ww: Tensor, *params: Tensor) -> Tensor:
        return functional_call(module, dict(zip(keys, params, strict=True)), (xx, ww))

    assert torch.autograd.gradcheck(fn, (x, weights, *[p for _, p in names_params]))


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_flexact_train_forward_gradcheck_with_fixed_noise(granularity: str) -> None:
    channels = 3 if granularity == "channel" else None
    layer = FlexAct(granularity=granularity, num_channels=channels, tau=0.7).double().train()
    torch.manual_seed(5)
    with torch.no_grad():
        layer.logits.normal_()
    x = _away_from_zero((4, 3, 2), torch.float64, seed=6).requires_grad_(True)
    logits = layer.logits.detach().clone().requires_grad_(True)

    def fn(xx: Tensor, lg: Tensor) -> Tensor:
        torch.manual_seed(7)  # the same Gumbel noise on every call: a deterministic function
        return functional_call(layer, {"logits": lg}, (xx,))

    assert torch.autograd.gradcheck(fn, (x, logits))


# --------------------------------------------------------------------------------------------
# Gumbel-Softmax sampling
# --------------------------------------------------------------------------------------------


def _chi_square(counts: Tensor, probs: Tensor) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


PROBS = (0.1, 0.2, 0.3, 0.15, 0.25)


def test_gumbel_argmax_frequency_matches_softmax_layer() -> None:
    n = 100_000
    layer = FlexAct(tau=1.0)
    probs = torch.tensor(PROBS, dtype=torch.float64)
    _set_logits(layer, torch.log(probs).tolist())
    torch.manual_seed(8)
    with torch.no_grad():
        draws = torch.stack([layer.sample_weights() for _ in range(n)])
    assert draws.shape == (n, 5)
    torch.testing.assert_close(draws.sum(dim=1), torch.ones(n), rtol=0, atol=1e-5)
    counts = torch.bincount(draws.argmax(dim=1), minlength=5).double()
    assert _chi_square(counts, probs) < CHI2_4DOF_Q999
    # The statistic is sharp enough to reject a wrong distribution (e.g. uniform).
    assert _chi_square(counts, torch.full((5,), 0.2, dtype=torch.float64)) > CHI2_4DOF_Q999


@pytest.mark.parametrize("tau", [0.05, 1.0, 5.0])
def test_gumbel_argmax_frequency_matches_softmax_channel(tau: float) -> None:
    # One draw of a per-channel layer is 10^5 independent draws (one per channel); the argmax of a
    # Gumbel-Softmax sample does not depend on τ.
    n = 100_000
    layer = FlexAct(granularity="channel", num_channels=n, tau=tau)
    probs = torch.tensor(PROBS, dtype=torch.float64)
    _set_logits(layer, torch.log(probs).expand(n, 5).tolist())
    torch.manual_seed(9)
    with torch.no_grad():
        draws = layer.sample_weights()
    assert draws.shape == (n, 5)
    counts = torch.bincount(draws.argmax(dim=1), minlength=5).double()
    assert _chi_square(counts, probs) < CHI2_4DOF_Q999
    assert _chi_square(counts, torch.full((5,), 0.2, dtype=torch.float64)) > CHI2_4DOF_Q999


def test_sample_weights_temperature_controls_sharpness() -> None:
    layer = FlexAct(granularity="channel", num_channels=2000, tau=0.1)
    torch.manual_seed(10)
    with torch.no_grad():
        sharp = layer.sample_weights().max(dim=1).values.mean()
        layer.tau = 100.0
        flat = layer.sample_weights().max(dim=1).values.mean()
    assert sharp > 0.9  # nearly one-hot at low temperature
    assert flat < 0.25  # nearly uniform (0.2) at high temperature


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_straight_through_one_hot_forward_and_soft_gradient(granularity: str) -> None:
    channels = 6 if granularity == "channel" else None
    hard = FlexAct(tau=0.5, hard=True, granularity=granularity, num_channels=channels)
    soft = FlexAct(tau=0.5, hard=False, granularity=granularity, num_channels=channels)
    torch.manual_seed(11)
    with torch.no_grad():
        hard.logits.normal_()
        soft.logits.copy_(hard.logits)
    coeff = torch.randn(hard.logits.shape)

    torch.manual_seed(12)
    w_hard = hard.sample_weights()
    torch.manual_seed(12)
    w_soft = soft.sample_weights()

    # Forward: exactly one-hot (only 0.0 and 1.0, one 1 per row), at the soft sample's argmax.
    rows_hard = w_hard.detach().reshape(-1, 5)
    assert torch.all((rows_hard == 0.0) | (rows_hard == 1.0))
    assert torch.equal(rows_hard.sum(dim=1), torch.ones(rows_hard.shape[0]))
    assert torch.equal(rows_hard.argmax(dim=1), w_soft.detach().reshape(-1, 5).argmax(dim=1))
    assert not torch.all((w_soft == 0.0) | (w_soft == 1.0))

    # Backward: the gradient of the soft sample drawn with the same noise.
    (grad_hard,) = torch.autograd.grad((w_hard * coeff).sum(), hard.logits)
    (grad_soft,) = torch.autograd.grad((w_soft * coeff).sum(), soft.logits)
    assert grad_hard.abs().sum() > 0
    torch.testing.assert_close(grad_hard, grad_soft, rtol=0, atol=0)


def test_hard_training_forward_is_exactly_one_candidate() -> None:
    layer = FlexAct(hard=True, tau=1.0)
    x = torch.randn(16, 9, generator=torch.Generator().manual_seed(13))
    picked = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = layer(x)
        torch.manual_seed(seed)
        pick = int(layer.sample_weights().argmax())
        picked.add(layer.candidate_names[pick])
        expected = layer.candidates[pick](x)
        if layer.candidate_names[pick] == "tanh":  # evaluated as 2σ(2x) − 1: within one ulp
            torch.testing.assert_close(out, expected, rtol=0, atol=2.5e-7)
        else:  # the other weights are exactly zero, so nothing else leaks in
            assert torch.equal(out, expected), layer.candidate_names[pick]
    assert len(picked) >= 3


# --------------------------------------------------------------------------------------------
# Eval modes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("winner", range(5))
def test_eval_argmax_layer_is_bit_exact(winner: int) -> None:
    layer = FlexAct()
    logits = [0.0] * 5
    logits[winner] = 1.5
    _set_logits(layer, logits)
    layer.eval()
    x = torch.randn(8, 33, generator=torch.Generator().manual_seed(14))
    plain = {
        "relu": torch.relu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.01),
        "identity": lambda t: t,
    }[PAPER_CANDIDATES[winner]]
    assert layer.selected() == [PAPER_CANDIDATES[winner]]
    assert torch.equal(layer(x), plain(x))


def test_eval_argmax_tanh_bit_exact_and_differentiable() -> None:
    layer = FlexAct()
    _set_logits(layer, [0.1, 0.0, 2.0, 0.3, -1.0])
    layer.eval()
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(15), requires_grad=True)
    out = layer(x)
    assert torch.equal(out, torch.tanh(x))
    out.sum().backward()
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)


@pytest.mark.parametrize("channel_dim", [1, -1])
def test_eval_argmax_channel_picks_per_channel(channel_dim: int) -> None:
    picks = [2, 0, 4, 1, 3, 2, 1]  # tanh, relu, identity, sigmoid, leaky_relu, tanh, sigmoid
    c = len(picks)
    layer = FlexAct(granularity="channel", num_channels=c, channel_dim=channel_dim)
    logits = torch.zeros(c, 5)
    logits[torch.arange(c), torch.tensor(picks)] = 1.0
    _set_logits(layer, logits.tolist())
    layer.eval()
    assert layer.selected() == [PAPER_CANDIDATES[j] for j in picks]
    shape = (3, c, 5) if channel_dim == 1 else (3, 5, c)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(16))
    out = layer(x)
    plain = [
        torch.relu(x),
        torch.sigmoid(x),
        torch.tanh(x),
        torch.nn.functional.leaky_relu(x, 0.01),
        x,
    ]
    for ch, j in enumerate(picks):
        assert torch.equal(out.select(channel_dim, ch), plain[j].select(channel_dim, ch)), ch


@pytest.mark.parametrize(
    ("granularity", "shape"), [("layer", (6, 4)), ("channel", (6, 4)), ("channel", (2, 4, 3))]
)
def test_eval_expected_is_softmax_blend(granularity: str, shape: tuple[int, ...]) -> None:
    channels = 4 if granularity == "channel" else None
    layer = FlexAct(eval_mode="expected", granularity=granularity, num_channels=channels)
    torch.manual_seed(17)
    with torch.no_grad():
        layer.logits.normal_()
    layer.eval()
    x = torch.randn(shape)
    probs = torch.softmax(layer.logits.detach(), dim=-1)
    expected = _naive_mixture(x, probs, list(layer.candidates), None if channels is None else 1)
    rng = torch.get_rng_state()
    out = layer(x)
    assert torch.equal(torch.get_rng_state(), rng), "eval must not draw Gumbel noise"
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(layer(x), out, rtol=0, atol=0)
    # A different candidate blend is clearly different (the check above can fail).
    assert not torch.allclose(out, torch.relu(x))


def test_eval_forward_does_not_update_targets() -> None:
    layer = FlexAct().eval()
    layer(torch.randn(4, 3))
    assert layer._targets is None
    assert layer.kl_divergence().item() == 0.0


# --------------------------------------------------------------------------------------------
# Regularizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_lambda", [1.0, 0.25])
def test_regularizer_layer_by_hand(kl_lambda: float) -> None:
    layer = FlexAct(candidates=["relu", "identity"], kl_lambda=kl_lambda)
    logits = [0.3, -0.2]
    _set_logits(layer, logits)
    x = torch.tensor([[1.0, -2.0], [-3.0, -4.0]])
    # relu': sample 1 -> [1, 0] (norm 1), sample 2 -> [0, 0] (norm 0): ḡ = 0.5.
    # identity': all ones, per-sample norm √2: ḡ = √2.
    g = [0.5, math.sqrt(2.0)]
    torch.testing.assert_close(layer.gradient_norms(x), torch.tensor(g))
    target = _softmax_list([-gi / kl_lambda for gi in g])
    expected = _kl(target, _softmax_list(logits))

    layer.train()
    layer(x)
    torch.testing.assert_close(layer._targets, torch.tensor(target))
    assert layer.kl_divergence().item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0.01  # not a trivially-zero case


def test_regularizer_channel_by_hand() -> None:
    layer = FlexAct(candidates=["relu", "identity"], granularity="channel", num_channels=2)
    logits = [[0.1, 0.4], [-0.3, 0.2]]
    _set_logits(layer, logits)
    # x[n, c, l]: batch 2, channels 2, length 2.
    x = torch.tensor([[[1.0, 2.0], [-1.0, -1.0]], [[-1.0, 3.0], [2.0, 2.0]]])
    r2 = math.sqrt(2.0)
    # channel 0: relu' rows [1,1] -> √2 and [0,1] -> 1; identity √2 for both samples.
    # channel 1: relu' rows [0,0] -> 0 and [1,1] -> √2; identity √2 for both samples.
    g = [[(r2 + 1.0) / 2, r2], [r2 / 2, r2]]
    torch.testing.assert_close(layer.gradient_norms(x, channel_dim=1), torch.tensor(g))
    layer(x)
    kls = [
        _kl(_softmax_list([-v for v in g_c]), _softmax_list(l_c))
        for g_c, l_c in zip(g, logits, strict=True)
    ]
    assert layer.kl_divergence().item() == pytest.approx(sum(kls) / 2, rel=1e-5)


def _head_with_known_weight(granularity: str, prior: Sequence[float] | None) -> FlexActHead:
    head = FlexActHead(3, 2, candidates=["relu", "identity"], granularity=granularity, prior=prior)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0]]))
        head.linear.bias.copy_(torch.tensor([0.0, 0.5]))
    return head


HEAD_X = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))  # h = x Wᵀ + b: [1, 0.5] and [2, -0.5]


def test_regularizer_head_layer_by_hand() -> None:
    head = _head_with_known_weight("layer", prior=[0.25, 0.75])
    x = torch.tensor(HEAD_X)
    # g = ||σ'(h) W||₂ per sample. relu': [1,1] -> ||[1,1,1]|| = √3; [1,0] -> ||W₀|| = √5.
    # identity: [1,1] W = [1,1,1] -> √3 for both samples.
    g = [(math.sqrt(3.0) + math.sqrt(5.0)) / 2, math.sqrt(3.0)]
    target = _softmax_list([-v for v in g])
    expected = _kl(target, [0.25, 0.75])
    head.train()
    out = head(x)
    assert out.shape == (2, 2)
    torch.testing.assert_close(head.flexact._targets, torch.tensor(target))
    assert head.flexact.kl_divergence().item() == pytest.approx(expected, rel=1e-5)
    # Without the input weight the measured norms differ: the head really uses W.
    h = head.linear(x).detach()
    assert not torch.allclose(head.flexact.gradient_norms(h), torch.tensor(g))


def test_regularizer_head_channel_by_hand() -> None:
    head = _head_with_known_weight("channel", prior=None)
    x = torch.tensor(HEAD_X)
    r2, r5 = math.sqrt(2.0), math.sqrt(5.0)
    # channel c: g = |σ'(h_c)|·||W_c||. c=0: relu' 1,1 -> √5; c=1: relu' 1,0 -> √2/2.
    g = [[r5, r5], [r2 / 2, r2]]
    head.train()
    head(x)
    kls = [_kl(_softmax_list([-v for v in g_c]), [0.5, 0.5]) for g_c in g]
    assert head.flexact.kl_divergence().item() == pytest.approx(sum(kls) / 2, rel=1e-5)


def test_regularizer_standard_normal_prefers_small_gradients() -> None:
    torch.manual_seed(18)
    x = torch.randn(4096, 64)
    layer = FlexAct()  # paper five, λ = 1
    layer(x)
    targets = layer._targets
    assert targets is not None and targets.shape == (5,)
    idx = {n: i for i, n in enumerate(PAPER_CANDIDATES)}
    assert targets[idx["sigmoid"]] > targets[idx["relu"]]
    assert int(targets.argmax()) == idx["sigmoid"]  # σ' <= 1/4: the smallest gradients
    assert int(targets.argmin()) == idx["identity"]  # derivative 1 everywhere: the largest
    assert targets[idx["relu"]] > targets[idx["leaky_relu"]]
    # ḡ agrees with an independent autograd computation (per-sample L2 norm, batch mean).
    g = []
    for act in layer.candidates:
        xg = x.clone().requires_grad_(True)
        (d,) = torch.autograd.grad(act(xg).sum(), xg)
        g.append(d.norm(dim=1).mean())
    g_ref = torch.stack(g)
    assert g_ref[idx["identity"]].item() == pytest.approx(8.0)
    torch.testing.assert_close(targets, torch.softmax(-g_ref, dim=0))


def test_regularizer_skipped_without_grad_or_when_disabled() -> None:
    x = torch.randn(5, 3)
    layer = FlexAct(regularize=False)
    layer(x)
    assert layer._targets is None
    layer = FlexAct()
    with torch.no_grad():
        layer(x)
    assert layer._targets is None
    assert layer.kl_divergence().item() == 0.0


def test_kl_zero_when_logits_equal_targets() -> None:
    layer = FlexAct()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(19))
    layer(x)
    assert layer.kl_divergence().item() > 0
    _set_logits(layer, torch.log(layer._targets).tolist())
    assert abs(layer.kl_divergence().item()) < 1e-6


def _two_layer_model() -> nn.Sequential:
    torch.manual_seed(20)
    return nn.Sequential(
        nn.Linear(6, 5),
        FlexAct(tau=0.5),
        nn.Linear(5, 4),
        FlexAct(granularity="channel", num_channels=4, channel_dim=-1),
        nn.Sequential(nn.Linear(4, 3), FlexAct(candidates=["relu", "tanh", "gelu"])),
    )


def test_selection_kl_sums_layers_and_gradient_is_analytic() -> None:
    model = _two_layer_model()
    for _, layer in flexact_layers(model):
        with torch.no_grad():
            layer.logits.normal_()
    model(torch.randn(16, 6))
    layers = [layer for _, layer in flexact_layers(model)]
    assert [name for name, _ in flexact_layers(model)] == ["1", "3", "4.1"]

    total = selection_kl(model)
    parts = [layer.kl_divergence() for layer in layers]
    torch.testing.assert_close(total, torch.stack(parts).sum())
    assert all(part.item() > 0 for part in parts)

    grads = torch.autograd.grad(total, [layer.logits for layer in layers])
    for layer, grad in zip(layers, grads, strict=True):
        expected = torch.softmax(layer.logits.detach(), dim=-1) - layer._targets
        if layer.granularity == "channel":
            expected = expected / layer.num_channels  # the KL is averaged over channels
        torch.testing.assert_close(grad, expected)
    # Only the logits receive gradient from the regularizer.
    linear_params = [p for n, p in model.named_parameters() if not n.endswith("logits")]
    assert all(
        g is None
        for g in torch.autograd.grad(selection_kl(model), linear_params, allow_unused=True)
    )


def test_selection_kl_without_flexact_layers_is_zero() -> None:
    assert selection_kl(nn.Linear(3, 2)).item() == 0.0
    assert selection_kl(nn.ReLU()).item() == 0.0


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_saved_bytes_at_most_one_and_a_half_relu(granularity: str) -> None:
    torch.manual_seed(21)
    channels = 256 if granularity == "channel" else None
    layer = FlexAct(granularity=granularity, num_channels=channels).train()
    x = torch.randn(64, 256, requires_grad=True)
    relu_bytes = saved_bytes(lambda: nn.ReLU()(x))
    flexact_bytes = saved_bytes(lambda: layer(x))
    assert relu_bytes >= x.numel() * x.element_size()
    assert flexact_bytes <= 1.5 * relu_bytes, (flexact_bytes, relu_bytes)
    # The measurement is discriminating: a naive autograd blend saves several activations.
    w = layer.sample_weights()
    cd = None if channels is None else 1
    naive_bytes = saved_bytes(lambda: _naive_mixture(x, w, list(layer.candidates), cd))
    assert naive_bytes > 3 * relu_bytes


# --------------------------------------------------------------------------------------------
# Numerical safety
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16_autocast"])
@pytest.mark.parametrize("tau", [1e-4, 1e-2, 1.0, 100.0])
def test_flexact_finite_for_extreme_tau(tau: float, autocast: bool, hard: bool) -> None:
    torch.manual_seed(22)
    linear = nn.Linear(8, 16)
    layer = FlexAct(tau=tau, hard=hard)
    with torch.no_grad():
        layer.logits.copy_(torch.tensor([0.5, -0.3, 0.1, 0.0, 0.2]))
    x = (torch.randn(32, 8) * 50).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = linear(x)
        assert h.dtype == (torch.bfloat16 if autocast else torch.float32)
        out = layer(h)
        loss = out.float().square().mean() + selection_kl(layer)
    loss.backward()
    assert out.dtype == h.dtype
    assert torch.isfinite(out).all()
    for t in (x.grad, layer.logits.grad, linear.weight.grad):
        assert t is not None and torch.isfinite(t).all()


def test_flexact_all_candidates_under_bf16_autocast() -> None:
    torch.manual_seed(23)
    names = [n for n in flexact.available_activations() if n in _BUILTINS]
    linear = nn.Linear(4, 6)
    layer = FlexAct(candidates=names, granularity="channel", num_channels=6, channel_dim=-1)
    x = (torch.randn(10, 4) * 100).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(linear(x))
        loss = out.float().sum() + selection_kl(layer)
    loss.backward()
    assert torch.isfinite(out).all()
    for p in (x, *layer.parameters(), *linear.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()


# --------------------------------------------------------------------------------------------
# Temperature, state dict, inspection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_state_dict_round_trips_logits_and_tau(granularity: str) -> None:
    channels = 3 if granularity == "channel" else None
    layer = FlexAct(granularity=granularity, num_channels=channels)
    torch.manual_seed(24)
    with torch.no_grad():
        layer.logits.normal_()
    layer.tau = 0.3
    state = layer.state_dict()
    assert set(state) == {"logits", "temperature", "_extra_state"}
    assert state["_extra_state"] == {"candidates": list(layer.candidate_names)}
    fresh = FlexAct(granularity=granularity, num_channels=channels)
    assert fresh.tau == 1.0
    fresh.load_state_dict(state)
    assert fresh.tau == layer.tau
    assert fresh.tau == pytest.approx(0.3, rel=1e-6)
    assert torch.equal(fresh.logits, layer.logits)
    assert fresh.selected() == layer.selected()


def test_tau_setter_and_buffer() -> None:
    layer = FlexAct(tau=2.0)
    assert layer.tau == 2.0
    assert isinstance(layer.temperature, Tensor) and layer.temperature.dim() == 0
    layer.tau = 0.125
    assert layer.tau == 0.125
    assert float(layer.temperature) == 0.125


@pytest.mark.parametrize("prior", [None, [1.0, 2.0, 3.0, 2.0, 2.0]])
def test_probabilities_and_selected_layer(prior: list[float] | None) -> None:
    layer = FlexAct(prior=prior)
    probs = layer.probabilities()
    assert probs.shape == (5,)
    assert not probs.requires_grad
    expected = torch.full((5,), 0.2) if prior is None else torch.tensor(prior) / sum(prior)
    torch.testing.assert_close(probs, expected)
    assert layer.selected() == (["relu"] if prior is None else ["tanh"])
    _set_logits(layer, [0.0, 0.0, 0.0, 0.0, 3.0])
    assert layer.selected() == ["identity"]
    torch.testing.assert_close(layer.probabilities(), torch.softmax(layer.logits.detach(), 0))


def test_probabilities_and_selected_channel() -> None:
    layer = FlexAct(granularity="channel", num_channels=4, prior=[1.0, 1.0, 1.0, 5.0, 2.0])
    probs = layer.probabilities()
    assert probs.shape == (4, 5)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(probs[2], torch.tensor([0.1, 0.1, 0.1, 0.5, 0.2]))
    assert layer.selected() == ["leaky_relu"] * 4
    _set_logits(layer, torch.eye(4, 5).mul(4.0).tolist())
    assert layer.selected() == ["relu", "sigmoid", "tanh", "leaky_relu"]
    assert layer.logits.shape == (4, 5)


def test_candidate_kwargs_reach_candidates() -> None:
    layer = FlexAct(
        candidates=["leaky_relu", "prelu"],
        candidate_kwargs={"leaky_relu": {"negative_slope": 0.2}, "prelu": {"init": 0.5}},
    )
    assert layer.candidates[0].negative_slope == 0.2
    assert float(layer.candidates[1].weight.detach()) == 0.5


def test_flexact_head_shapes() -> None:
    torch.manual_seed(25)
    head = FlexActHead(12, 3, hidden_features=7, granularity="channel")
    out = head(torch.randn(5, 3, 4))  # flattened to (5, 12)
    assert out.shape == (5, 3)
    assert head.flexact.logits.shape == (7, 5)
    assert head.flexact._targets is not None and head.flexact._targets.shape == (7, 5)
    single = FlexActHead(4, 2)
    assert single.output is None
    assert single(torch.randn(3, 4)).shape == (3, 2)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"candidates": ["relu", "nope"]}, r"unknown activation 'nope'.*relu.*sigmoid"),
        ({"candidates": ["relu", "tanh", "relu"]}, r"duplicate candidates \['relu'\]"),
        ({"candidates": []}, "candidates is empty"),
        ({"candidates": "relu"}, "list of names"),
        ({"tau": 0.0}, "tau must be a finite number > 0"),
        ({"tau": -1.0}, "tau must be a finite number > 0"),
        ({"tau": float("nan")}, "tau must be a finite number > 0"),
        ({"tau": float("inf")}, "tau must be a finite number > 0"),
        ({"tau": "warm"}, "tau must be a number > 0"),
        ({"granularity": "channel"}, "needs num_channels"),
        ({"granularity": "channel", "num_channels": 0}, "needs num_channels"),
        ({"granularity": "neuron"}, "granularity must be 'layer' or 'channel'"),
        ({"eval_mode": "sample"}, "eval_mode must be 'argmax' or 'expected'"),
        ({"prior": [0.5, 0.5]}, "prior must hold 5 finite positive numbers"),
        ({"prior": [1.0, 1.0, 0.0, 1.0, 1.0]}, "prior must hold 5 finite positive numbers"),
        ({"prior": [1.0, 1.0, -1.0, 1.0, 1.0]}, "prior must hold 5 finite positive"),
        ({"prior": [1.0, 1.0, float("nan"), 1.0, 1.0]}, "prior must hold 5 finite positive"),
        ({"kl_lambda": 0.0}, "kl_lambda must be a finite number > 0"),
        ({"kl_lambda": -2.0}, "kl_lambda must be a finite number > 0"),
        ({"kl_lambda": float("inf")}, "kl_lambda must be a finite number > 0"),
        ({"candidate_kwargs": {"gelu": {}}}, r"candidate_kwargs names \['gelu'\]"),
    ],
)
def test_flexact_bad_arguments_raise_config_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        FlexAct(**kwargs)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf")])
def test_setting_bad_tau_raises_and_keeps_old_value(bad: float) -> None:
    layer = FlexAct(tau=0.5)
    with pytest.raises(ConfigError, match="tau must be a finite number > 0"):
        layer.tau = bad
    assert layer.tau == 0.5


def test_channel_count_mismatch_at_forward_is_plain_value_error() -> None:
    layer = FlexAct(granularity="channel", num_channels=4)
    with pytest.raises(ValueError, match=r"expected 4 channels in dim 1.*\(2, 3\)") as info:
        layer(torch.randn(2, 3))
    assert not isinstance(info.value, ConfigError)
    layer.eval()
    with pytest.raises(ValueError, match="expected 4 channels"):
        layer(torch.randn(2, 5, 3))


def test_flexact_head_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="in_features must be a positive int"):
        FlexActHead(0, 2)
    with pytest.raises(ConfigError, match="hidden_features must be a positive int"):
        FlexActHead(3, 2, hidden_features=-1)
    with pytest.raises(ConfigError, match="unknown activation"):
        FlexActHead(3, 2, candidates=["relu", "nope"])


# --------------------------------------------------------------------------------------------
# Regressions: float64 with parameterized candidates, out-of-range channel_dim
# --------------------------------------------------------------------------------------------


def test_float64_layer_with_parameterized_candidate_trains() -> None:
    layer = FlexAct(candidates=["relu", "prelu", "swish_beta"]).double()
    x = _away_from_zero((6, 4), torch.float64, seed=26).requires_grad_(True)
    out = layer(x)
    (out.sum() + layer.kl_divergence()).backward()
    assert out.dtype == torch.float64
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_out_of_range_channel_dim_is_rejected() -> None:
    layer = FlexAct(granularity="channel", num_channels=4, channel_dim=2)
    with pytest.raises(ValueError, match="channel"):
        layer(torch.randn(4, 4))


def test_readme_plain_pytorch_example_picks_tanh(capsys: pytest.CaptureFixture[str]) -> None:
    from .conftest import REPO

    text = (REPO / "README.md").read_text()
    block = text.split("<!-- readme-example:start -->")[1].split("<!-- readme-example:end -->")[0]
    code = block.split("```python")[1].split("```")[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("['tanh']")


def test_pass_through_user_candidate_does_not_corrupt_the_saved_input() -> None:
    from flexact import register_activation
    from flexact.nn.registry import _REGISTRY

    @register_activation("test_passthrough")
    class PassThrough(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x

    try:
        x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
        w = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
        cands = [PassThrough(), nn.Tanh()]
        assert torch.autograd.gradcheck(lambda a, b: mixture(a, b, cands), (x, w))
    finally:
        _REGISTRY.pop("test_passthrough")


def test_commit_fixes_the_pick_without_reading_logits_each_step() -> None:
    layer = FlexAct(candidates=["relu", "tanh"])
    _set_logits(layer, [0.0, 1.0])
    layer.train()
    layer.commit()
    assert layer.committed_index == 1
    x = torch.randn(5, 3)
    _set_logits(layer, [5.0, 0.0])  # logits no longer train once committed: the pick is kept
    assert torch.equal(layer(x), torch.tanh(x))
    layer.commit()  # committing again reads the current logits
    assert layer.committed_index == 0 and torch.equal(layer(x), torch.relu(x))
    layer.commit(False)
    assert layer.committed_index is None
    channel = FlexAct(candidates=["relu", "tanh"], granularity="channel", num_channels=3)
    _set_logits(channel, [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    channel.commit()
    assert channel.committed_index is None and channel.picks().tolist() == [1, 0, 1]


def test_kernel_count_counts_kernels_not_views() -> None:
    x = torch.randn(4, 6, requires_grad=True)
    assert kernel_count(lambda: torch.relu(x)) == 1
    assert kernel_count(lambda: x.view(24).t().unsqueeze(0)) == 0  # views launch nothing
    assert kernel_count(lambda: torch.relu(x).sum().backward()) >= 4  # relu, sum, and backward
    layer = FlexAct(regularize=False)
    # A training forward: the Gumbel sample (7 small kernels), five candidates, the mixture.
    assert 10 < kernel_count(lambda: layer(x)) < 60


def test_selection_kl_batches_layers_and_matches_the_per_layer_sum() -> None:
    class Doubled(FlexAct):  # a subclass with its own KL must still be asked for it
        def kl_divergence(self) -> Tensor:
            return 2 * super().kl_divergence()

    layers = [FlexAct() for _ in range(6)] + [Doubled(), FlexAct(candidates=["relu", "tanh"])]
    layers += [FlexAct(granularity="channel", num_channels=3) for _ in range(3)]
    model = nn.Sequential(*layers)
    for layer in layers:
        with torch.no_grad():
            layer.logits.normal_()
    x = torch.randn(8, 3)
    for layer in layers:
        layer(x)
    layers[2].commit()  # a committed layer contributes nothing
    for reduction in ("sum", "mean"):
        total = selection_kl(model, reduction)  # type: ignore[arg-type]
        parts = [layer.kl_divergence() for layer in layers]
        expected = torch.stack(parts).sum() / (len(layers) if reduction == "mean" else 1)
        torch.testing.assert_close(total, expected)
        got = torch.autograd.grad(total, [layer.logits for layer in layers], allow_unused=True)
        want = torch.autograd.grad(expected, [layer.logits for layer in layers],
                                   allow_unused=True)
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None) or torch.count_nonzero(g if w is None else w) == 0
            if g is not None and w is not None:
                torch.testing.assert_close(g, w)
    assert parts[6] > 0 and torch.equal(parts[6], 2 * FlexAct.kl_divergence(layers[6]))
    # One batched KL per logits shape (five-candidate, per-channel): fewer kernels.
    assert kernel_count(lambda: selection_kl(model)) < 0.7 * kernel_count(
        lambda: torch.stack([layer.kl_divergence() for layer in layers]).sum())
