"""selection_gradient="standardized": candidates compared by shape, not by scale or offset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flexact import ConfigError, FlexAct
from flexact.nn.footing import standardized_mixture, standardized_weights
from flexact.nn.kernels import takes_small_path


class _Affine(nn.Module):
    """``scale · tanh(x) + shift``: tanh's shape at another scale and offset."""

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.tanh(x) + self.shift


def _weight_grad(candidates: list[nn.Module], x: torch.Tensor, g: torch.Tensor,
                 standardized: bool) -> torch.Tensor:
    weights = torch.full((len(candidates),), 1.0 / len(candidates), requires_grad=True)
    mixing, offset = (standardized_weights(x, weights, candidates, None) if standardized
                      else (weights, torch.zeros(())))
    out = sum(w * c(x) for w, c in zip(mixing, candidates, strict=True)) + offset
    torch.testing.assert_close(out, sum(w * c(x) for w, c in zip(weights, candidates, strict=True)))
    (grad,) = torch.autograd.grad(out, weights, g)
    return grad


def test_the_weight_gradient_ignores_a_candidates_scale_and_offset() -> None:
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(64, 8, generator=gen), torch.randn(64, 8, generator=gen)
    candidates: list[nn.Module] = [nn.Tanh(), _Affine(5.0, 3.0), nn.ReLU()]
    raw = _weight_grad(candidates, x, g, standardized=False)
    assert not torch.isclose(raw[0], raw[1], rtol=0.1)  # raw: scale and offset change it
    std = _weight_grad(candidates, x, g, standardized=True)
    torch.testing.assert_close(std[0], std[1], rtol=1e-4, atol=1e-5)
    z = (torch.relu(x) - torch.relu(x).mean()) / torch.relu(x).std()
    torch.testing.assert_close(std[2], (g * z).sum(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [False, True])  # offset + mixture, or one autograd function
def test_per_channel_weights_see_each_channels_standardized_outputs(fused: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(16, 3, 5, generator=gen), torch.randn(16, 3, 5, generator=gen)
    x = x * torch.tensor([0.5, 2.0, 4.0]).reshape(1, 3, 1)  # channels of different scales
    x.requires_grad_(True)
    candidates: list[nn.Module] = [nn.ReLU(), _Affine(3.0, -1.0), nn.Identity()]
    weights = torch.rand((3, 3), generator=gen).softmax(-1).requires_grad_(True)
    plain = sum(weights[:, j].reshape(1, 3, 1) * c(x) for j, c in enumerate(candidates))
    if fused:  # channels in the middle: the stacked outputs are moved, not just reshaped
        out = standardized_mixture(x, weights, candidates, 1)
    else:
        mixing, offset = standardized_weights(x, weights, candidates, 1)
        out = sum(mixing[:, j].reshape(1, 3, 1) * c(x) for j, c in enumerate(candidates)) + offset
    torch.testing.assert_close(out, plain)
    grad, x_grad = torch.autograd.grad(out, (weights, x), g)
    torch.testing.assert_close(x_grad, torch.autograd.grad(plain, x, g)[0])
    for j, candidate in enumerate(candidates):
        f = candidate(x)
        z = (f - f.mean(dim=(0, 2), keepdim=True)) / f.std(dim=(0, 2), keepdim=True)
        torch.testing.assert_close(grad[:, j], (g * z).sum(dim=(0, 2)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("granularity", "candidates", "drop", "dtype", "scale", "batch"), [
    ("layer", None, (), torch.float32, 1.0, 512),  # the closed-form mixture (a large input)
    ("channel", None, (), torch.float32, 1.0, 512),
    ("layer", None, ("tanh",), torch.float32, 1.0, 512),  # pruned: the live candidates only
    ("layer", ("gelu", "silu", "tanh"), (), torch.float32, 1.0, 512),  # the general mixture
    ("layer", None, (), torch.bfloat16, 0.05, 512),  # μ/σ ≈ 40 for Sigmoid: the sum in float32
    ("channel", None, (), torch.bfloat16, 0.05, 512),
    # small inputs: one stack of outputs serves the moments and the mixture
    ("layer", None, (), torch.float32, 1.0, 32),
    ("channel", None, ("tanh",), torch.float32, 1.0, 32),
    ("layer", ("gelu", "silu", "tanh"), (), torch.float32, 1.0, 32),
    ("channel", None, (), torch.bfloat16, 0.05, 32),  # bf16: the closed form, in float32
])
def test_a_layers_weight_gradient_is_the_standardized_reference(
        granularity: str, candidates: tuple[str, ...] | None, drop: tuple[str, ...],
        dtype: torch.dtype, scale: float, batch: int) -> None:
    gen = torch.Generator().manual_seed(0)
    kwargs = {"num_channels": 64} if granularity == "channel" else {}
    if candidates:
        kwargs["candidates"] = list(candidates)
    # regularize=False: no ḡ wanted, so small inputs take the stacked outputs' path
    layer = FlexAct(selection_gradient="standardized", granularity=granularity,
                    regularize=False, **kwargs)
    layer.drop(list(drop))
    k = len(layer.live_names)
    weights = torch.full((64, k) if granularity == "channel" else (k,), 1 / k, requires_grad=True)
    layer._training_weights = lambda: weights  # type: ignore[method-assign]
    x = (torch.randn(batch, 64, generator=gen) * scale).to(dtype)
    g = torch.randn(batch, 64, generator=gen).to(dtype)
    assert takes_small_path(x) == (batch == 32 and dtype == torch.float32)
    (grad,) = torch.autograd.grad(layer(x), weights, g)
    dims = (0, 1) if granularity == "layer" else (0,)
    expected = []
    for candidate in layer.live_candidates():
        f = candidate(x.double())
        z = (f - f.mean(dims, keepdim=True)) / f.std(dims, keepdim=True)
        expected.append((g.double() * z).sum(dims))
    reference = torch.stack(expected, -1)
    error = (grad.double() - reference).abs().max() / reference.abs().max()
    # bf16 (32 samples a channel: 0.026); the offset's sum in bf16 gave 0.14, and the mixture
    # of bf16 outputs 0.12
    assert error < (0.04 if dtype == torch.bfloat16 else 1e-4)


def test_a_batch_of_one_gives_finite_outputs_and_no_selection_gradient() -> None:
    layer = FlexAct(selection_gradient="standardized", granularity="channel", num_channels=8)
    out = layer(torch.randn(1, 8))
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert layer.logits.grad is not None and not layer.logits.grad.any()  # no shape to compare


@pytest.mark.parametrize("regularize", [True, False])  # closed form (ḡ) or stacked outputs
@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_only_the_logits_gradient_changes(granularity: str, regularize: bool) -> None:
    kwargs = {"num_channels": 6} if granularity == "channel" else {}
    raw = FlexAct(granularity=granularity, regularize=regularize, **kwargs)
    std = FlexAct(granularity=granularity, selection_gradient="standardized",
                  regularize=regularize, **kwargs)
    std.load_state_dict(raw.state_dict())
    x = torch.randn(32, 6, requires_grad=True)
    g = torch.randn(32, 6)
    results = []
    for layer in (raw, std):
        torch.manual_seed(3)  # the same Gumbel sample
        out = layer(x)
        results.append((out, *torch.autograd.grad(out, (x, layer.logits), g)))
    torch.testing.assert_close(results[0][0], results[1][0])  # value
    torch.testing.assert_close(results[0][1], results[1][1])  # input gradient
    assert not torch.allclose(results[0][2], results[1][2])  # the selection's gradient


def test_a_standardized_layer_trains_and_picks_the_truth() -> None:
    """The standardized gradient still points the logits the right way (a flipped sign fails)."""
    torch.manual_seed(0)
    x = torch.randn(2048, 4)
    y = torch.sigmoid(5 * x[:, :1])
    model = nn.Sequential(nn.Linear(4, 1), FlexAct(selection_gradient="standardized"))
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": 0.05},
                            {"params": [model[1].logits], "lr": 0.5}])
    for step in range(400):
        batch = torch.randint(0, len(x), (64,))
        model[1].tau = max(0.2, 0.995 ** step)
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model[1].selected() == ["sigmoid"]


def test_a_bad_selection_gradient_is_a_clear_error() -> None:
    message = "selection_gradient must be 'auto', 'raw' or 'standardized'"
    with pytest.raises(ConfigError, match=message):
        FlexAct(selection_gradient="scaled")


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({}, "standardized"),  # a head-only head whose output map absorbs scale and offset
    ({"hidden_features": None}, "raw"),  # FlexAct's output is the prediction
    ({"swap_backbone": True}, "raw"),  # everywhere: the measured raw default, head included
    ({"flexact": {"selection_gradient": "raw"}}, "raw"),  # asked for (and old checkpoints)
])
def test_auto_standardizes_a_head_only_head_before_an_affine_map(kwargs: dict,
                                                                 expected: str) -> None:
    from flexact.backbones import MLP
    from flexact.modules import FlexActClassifier
    from flexact.nn.layer import flexact_layers

    settings = {"hidden_features": 8, **kwargs}
    module = FlexActClassifier(backbone=MLP(4, hidden=[6]), num_classes=3, **settings)
    layers = dict(flexact_layers(module.model))
    assert layers["head.flexact"].selection_gradient == expected
    assert all(layer.selection_gradient == "raw" for name, layer in layers.items()
               if name != "head.flexact")
    assert FlexAct().selection_gradient == "raw"  # a bare layer: "auto" is raw
