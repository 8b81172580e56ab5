"""The closed-form mixture (flexact.nn.kernels) against the general path it replaces."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from flexact import FlexAct
from flexact.nn import basis, kernels
from flexact.nn.kernels import BASIS, basis_row, closed_form_mixture

CASES = [
    pytest.param("layer", (4, 6, 5, 5), 1, id="layer_4d"),
    pytest.param("channel", (4, 6, 5, 5), 1, id="channel_4d"),
    pytest.param("channel", (4, 7, 6), -1, id="channel_last_dim_3d"),
    pytest.param("channel", (5, 6), 1, id="channel_2d"),
    pytest.param("layer", (5, 6), 1, id="layer_2d"),
]


def _step(layer: FlexAct, x: Tensor, seed: int = 1) -> dict[str, object]:
    """One training forward + backward with fixed noise and a fixed upstream gradient."""
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    (out * grad.to(out.dtype)).sum().backward()
    result = {"out": out.detach(), "grad_x": x.grad, "grad_logits": layer.logits.grad.clone(),
              "targets": layer._targets, "path": type(out.grad_fn).__name__}
    layer.logits.grad = None
    return result


def _layer(granularity: str, channel_dim: int, channels: int = 6, **kwargs: object) -> FlexAct:
    torch.manual_seed(0)
    layer = FlexAct(granularity=granularity,  # type: ignore[arg-type]
                    num_channels=channels if granularity == "channel" else None,
                    channel_dim=channel_dim, kl_lambda=0.3, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        layer.logits.normal_()
    return layer


def _compare(fast: dict[str, object], slow: dict[str, object], atol: float = 1e-6) -> None:
    assert "ClosedForm" in str(fast["path"]) and "ClosedForm" not in str(slow["path"])
    for key in ("out", "grad_x", "grad_logits", "targets"):
        # The logits' gradient sums over every element, in another order: a looser atol.
        tol = 10 * atol if key == "grad_logits" else atol
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-5, atol=tol, msg=key)


@pytest.mark.parametrize(("granularity", "shape", "channel_dim"), CASES)
def test_matches_the_general_path(granularity: str, shape: tuple[int, ...], channel_dim: int,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(granularity, channel_dim, channels=shape[channel_dim])
    x = 2 * torch.randn(shape, generator=torch.Generator().manual_seed(5))
    fast = _step(layer, x)
    monkeypatch.setattr(kernels, "basis_rows", lambda candidates: None)
    _compare(fast, _step(layer, x))


@pytest.mark.parametrize(
    "names",
    [("relu",), ("identity",), ("sigmoid",), ("tanh",), ("leaky_relu",), ("relu", "identity"),
     ("sigmoid", "tanh"), ("tanh", "leaky_relu", "sigmoid")],
)
@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_candidate_subsets_match(names: Sequence[str], granularity: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = {"candidate_kwargs": {"leaky_relu": {"negative_slope": 0.2}}} if (
        "leaky_relu" in names) else {}
    layer = _layer(granularity, 1, candidates=names, **kwargs)
    x = 2 * torch.randn(3, 6, 4, 4, generator=torch.Generator().manual_seed(7))
    fast = _step(layer, x)
    monkeypatch.setattr(kernels, "basis_rows", lambda candidates: None)
    _compare(fast, _step(layer, x))


@pytest.mark.parametrize("variant", ["channels_last", "compact_memory", "blend", "hard"])
def test_layouts_and_options_match(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs: dict[str, object] = {
        "compact_memory": {"compact_memory": True}, "blend": {"mode": "blend"},
        "hard": {"hard": True}}.get(variant, {})
    layer = _layer("layer", 1, **kwargs)
    x = 2 * torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(9))
    if variant == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    fast = _step(layer, x)
    if variant == "channels_last":
        assert fast["out"].is_contiguous(memory_format=torch.channels_last)  # type: ignore[union-attr]
    monkeypatch.setattr(kernels, "basis_rows", lambda candidates: None)
    _compare(fast, _step(layer, x))


def test_bfloat16_input_matches_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer("channel", 1)
    x = (2 * torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(11))).bfloat16()
    fast = _step(layer, x)
    assert fast["out"].dtype == torch.bfloat16  # type: ignore[union-attr]
    monkeypatch.setattr(kernels, "basis_rows", lambda candidates: None)
    slow = _step(layer, x)
    # Two different bf16 evaluation orders: a few bf16 ulps apart; ḡ is accumulated in float32.
    for key, atol in (("out", 0.02), ("grad_x", 0.05), ("grad_logits", 0.5), ("targets", 1e-3)):
        torch.testing.assert_close(fast[key].float(), slow[key].float(),  # type: ignore[union-attr]
                                   rtol=0.02, atol=atol, msg=key)


def test_gradient_norms_equal_the_layers_own_measurement() -> None:
    layer = _layer("channel", 1)
    x = 3 * torch.randn(8, 6, 4, 4, generator=torch.Generator().manual_seed(2))
    weights = torch.softmax(torch.randn(6, 5), dim=-1)
    result = closed_form_mixture(x, weights, layer.candidates, 1, want_norms=True)
    assert result is not None and result[1] is not None
    torch.testing.assert_close(result[1], layer.gradient_norms(x, channel_dim=1))
    # Identity's gradient norm per (sample, channel) is sqrt(16): a value known in advance.
    assert torch.allclose(result[1][:, 4], torch.full((6,), 4.0))


def test_only_exact_builtin_classes_have_a_closed_form() -> None:
    class MyReLU(nn.ReLU):
        def forward(self, x: Tensor) -> Tensor:
            return torch.relu(x) * 2

    assert basis_row(nn.ReLU()) == (1.0, 0.0, 0.0, 0.0, 0.0)
    assert basis_row(nn.LeakyReLU(0.25)) == (0.75, 0.25, 0.0, 0.0, 0.0)
    assert basis_row(MyReLU()) is None and basis_row(nn.GELU()) is None
    x = torch.randn(4, 3)
    assert closed_form_mixture(x, torch.ones(1), [MyReLU()]) is None
    out, _ = closed_form_mixture(x, torch.ones(1), [nn.ReLU()])  # type: ignore[misc]
    assert torch.equal(out, torch.relu(x))


def test_basis_rows_reproduce_the_candidates() -> None:
    """Every row, applied to the basis functions, is its candidate (the closed form's premise)."""
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    basis = torch.stack([torch.relu(x), x, torch.sigmoid(x), torch.sigmoid(2 * x),
                         torch.ones_like(x)])
    assert basis.shape[0] == len(BASIS)
    for act in (nn.ReLU(), nn.LeakyReLU(0.1), nn.Identity(), nn.Sigmoid(), nn.Tanh()):
        row = torch.tensor(basis_row(act), dtype=torch.float64)
        torch.testing.assert_close(row @ basis, act(x), rtol=0, atol=1e-12)


def test_compiles_without_graph_breaks() -> None:
    layer = _layer("channel", 1)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    torch.manual_seed(4)
    out = compiled(x)
    out.sum().backward()
    torch.manual_seed(4)
    torch.testing.assert_close(out, layer(x))
    assert x.grad is not None and layer.logits.grad is not None


# --------------------------------------------------------------------------------------------
# Batch norm + FlexAct in one step (FlexAct.forward_batchnorm)
# --------------------------------------------------------------------------------------------


class _NormAct(nn.Module):
    def __init__(self, norm: nn.Module, act: FlexAct, fused: bool) -> None:
        super().__init__()
        self.norm, self.act, self.fused = norm, act, fused

    def forward(self, z: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.fused:
            return self.act.forward_batchnorm(z, self.norm, residual)
        x = self.norm(z)
        return self.act(x if residual is None else x + residual)


def _norm_pair(norm: nn.Module, act: FlexAct) -> tuple[_NormAct, _NormAct]:
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    return _NormAct(norm, act, True), _NormAct(copy.deepcopy(norm), copy.deepcopy(act), False)


def _norm_step(model: _NormAct, z: Tensor, residual: Tensor | None) -> dict[str, object]:
    torch.manual_seed(3)
    z = z.detach().clone().requires_grad_(True)
    res = None if residual is None else residual.detach().clone().requires_grad_(True)
    out = model(z, res)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
    grads = {f"grad_{k}": v.grad.clone() for k, v in model.named_parameters()
             if v.grad is not None}
    model.zero_grad()
    return {"out": out.detach(), "grad_z": z.grad, "grad_residual": None if res is None
            else res.grad, "targets": model.act._targets, "path": type(out.grad_fn).__name__,
            **grads, **{k: v.clone() for k, v in model.norm.named_buffers()}}


NORM_CASES = [
    pytest.param("layer", nn.BatchNorm2d(6), (4, 6, 5, 5), False, False, id="2d"),
    pytest.param("channel", nn.BatchNorm2d(6), (4, 6, 5, 5), True, False, id="2d_residual"),
    pytest.param("layer", nn.BatchNorm2d(6), (4, 6, 5, 5), True, True, id="channels_last"),
    pytest.param("channel", nn.BatchNorm1d(6), (8, 6), False, False, id="1d_features"),
    pytest.param("layer", nn.BatchNorm1d(6, momentum=None), (4, 6, 7), True, False,
                 id="1d_cumulative_average"),
    pytest.param("layer", nn.BatchNorm2d(6, affine=False), (4, 6, 3, 3), False, False,
                 id="no_affine"),
    pytest.param("channel", nn.BatchNorm2d(6, track_running_stats=False), (4, 6, 3, 3), True,
                 False, id="no_running_stats"),
]


@pytest.mark.parametrize(("granularity", "norm", "shape", "residual", "channels_last"),
                         NORM_CASES)
def test_forward_batchnorm_matches_norm_then_layer(
    granularity: str, norm: nn.Module, shape: tuple[int, ...], residual: bool,
    channels_last: bool,
) -> None:
    fused, plain = _norm_pair(norm, _layer(granularity, 1))
    gen = torch.Generator().manual_seed(6)
    z = 3 * torch.randn(shape, generator=gen) + 1
    res = torch.randn(shape, generator=gen) if residual else None
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
        res = None if res is None else res.contiguous(memory_format=torch.channels_last)
    for step in range(2):  # twice: the running statistics must also agree after an update
        a, b = _norm_step(fused, z, res), _norm_step(plain, z, res)
        assert a["path"] == "_BatchNormMixtureBackward" and a["path"] != b["path"]
        assert set(a) == set(b)
        for key in a:
            if key != "path" and a[key] is not None:
                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5,
                                           msg=f"{key} (step {step})")
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(z, res), plain(z, res))  # eval: running statistics


def test_forward_batchnorm_gradcheck() -> None:
    act = FlexAct(granularity="channel", num_channels=3, mode="blend").double()
    model = _NormAct(nn.BatchNorm2d(3).double(), act, fused=True)
    z = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    res = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    params = dict(model.named_parameters())
    keys = list(params)

    def fn(zz: Tensor, rr: Tensor, *values: Tensor) -> Tensor:
        return torch.func.functional_call(model, dict(zip(keys, values, strict=True)), (zz, rr))

    values = [v.detach().clone().requires_grad_(True) for v in params.values()]
    assert type(fn(z, res, *values).grad_fn).__name__ == "_BatchNormMixtureBackward"
    assert torch.autograd.gradcheck(fn, (z, res, *values))


@pytest.mark.parametrize("case", ["eval", "committed", "group_norm", "no_closed_form"])
def test_forward_batchnorm_falls_back_where_it_does_not_apply(case: str) -> None:
    candidates = ("relu", "gelu") if case == "no_closed_form" else ("relu", "tanh")
    norm: nn.Module = nn.GroupNorm(2, 6) if case == "group_norm" else nn.BatchNorm2d(6)
    fused, plain = _norm_pair(norm, _layer("layer", 1, candidates=candidates))
    if case == "eval":
        fused.eval(), plain.eval()
    if case == "committed":
        fused.act.commit(), plain.act.commit()
    z = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(8))
    a, b = _norm_step(fused, z, None), _norm_step(plain, z, None)
    assert a["path"] == b["path"] != "_BatchNormMixtureBackward"
    for key in a:
        if key != "path" and a[key] is not None:
            torch.testing.assert_close(a[key], b[key], msg=key)


def test_flexact_resnet_stores_about_what_the_relu_resnet_stores() -> None:
    """Memory goal of issue 8 (≤ 1.15×), deterministic: bytes saved for backward."""
    from flexact.backbones import cifar_resnet18
    from flexact.tools.profiling import saved_bytes

    x = torch.randn(2, 3, 32, 32)
    relu_net, flex_net = cifar_resnet18(activation="relu"), cifar_resnet18(activation="flexact")
    for autocast in (False, True):  # float32, and bf16 as with bf16-mixed on a GPU
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            relu_bytes = saved_bytes(lambda: relu_net(x))
            flex_bytes = saved_bytes(lambda: flex_net(x))
        assert flex_bytes <= 1.05 * relu_bytes, (autocast, flex_bytes / relu_bytes)
        assert flex_bytes > relu_bytes  # FlexAct does keep a little more (downsample outputs)


def test_forward_batchnorm_compiles_without_graph_breaks() -> None:
    # The noise-free blend: inductor draws random numbers differently from eager.
    fused, plain = _norm_pair(nn.BatchNorm2d(6), _layer("channel", 1, mode="blend"))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    z = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(2))
    res = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(3))
    out = compiled(z, res)
    out.sum().backward()
    expected = plain(z, res)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(fused.norm.running_var, plain.norm.running_var)
    torch.testing.assert_close(fused.act.logits.grad, plain.act.logits.grad)


def test_forward_batchnorm_bfloat16_matches_norm_then_layer() -> None:
    fused, plain = _norm_pair(nn.BatchNorm2d(6), _layer("channel", 1))
    gen = torch.Generator().manual_seed(12)
    z = (3 * torch.randn(4, 6, 5, 5, generator=gen) + 1).bfloat16()
    res = torch.randn(4, 6, 5, 5, generator=gen).bfloat16()
    a, b = _norm_step(fused, z, res), _norm_step(plain, z, res)
    assert a["path"] == "_BatchNormMixtureBackward"
    for key in ("out", "grad_z", "grad_residual"):
        assert a[key].dtype == torch.bfloat16, key  # type: ignore[union-attr]
    # bf16 rounding of intermediate results differs between the two orders of evaluation.
    for key, atol in (("out", 0.03), ("grad_z", 0.05), ("grad_residual", 0.05),
                      ("grad_act.logits", 0.5), ("grad_norm.weight", 0.5),
                      ("grad_norm.bias", 0.5), ("targets", 1e-3), ("running_mean", 1e-3),
                      ("running_var", 1e-2)):
        torch.testing.assert_close(a[key].float(), b[key].float(),  # type: ignore[union-attr]
                                   rtol=0.03, atol=atol, msg=key)


# --------------------------------------------------------------------------------------------
# Edge cases (found in review)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_batchnorm_in_a_model_cast_to_half_precision(dtype: torch.dtype) -> None:
    fused, plain = _norm_pair(nn.BatchNorm2d(6), _layer("channel", 1, mode="blend"))
    fused.to(dtype), plain.to(dtype)
    gen = torch.Generator().manual_seed(3)
    z = (3 * torch.randn(4, 6, 5, 5, generator=gen) + 1).to(dtype)
    res = torch.randn(4, 6, 5, 5, generator=gen).to(dtype)
    a, b = _norm_step(fused, z, res), _norm_step(plain, z, res)
    assert a["path"] == "_BatchNormMixtureBackward"
    for key in ("out", "grad_z", "grad_norm.weight", "grad_act.logits", "running_var"):
        assert a[key].dtype == dtype, key  # type: ignore[union-attr]
        torch.testing.assert_close(a[key].float(), b[key].float(),  # type: ignore[union-attr]
                                   rtol=0.03, atol=0.1, msg=key)


def test_constants_made_under_inference_mode_still_train() -> None:
    basis._CONSTANTS.clear()
    layer = _layer("layer", 1, candidates=("relu", "sigmoid"), eval_mode="expected").eval()
    x = torch.randn(4, 6, 3, 3)
    with torch.inference_mode():  # e.g. Lightning's sanity-check validation comes first
        layer(x)
    layer.train()
    _step(layer, x)  # would fail: "Inference tensors cannot be saved for backward"
    assert layer.logits.grad is None  # (_step cleared it after checking it existed)


def test_float64_mixture_uses_exact_slopes() -> None:
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    out, _ = closed_form_mixture(x, torch.ones(1, dtype=torch.float64),  # type: ignore[misc]
                                 [nn.LeakyReLU(0.01)])
    torch.testing.assert_close(out, nn.functional.leaky_relu(x, 0.01), rtol=0, atol=1e-15)


def test_forward_batchnorm_respects_batchnorm_flags() -> None:
    norm = nn.BatchNorm2d(6)
    norm.track_running_stats = False  # switched off after construction: buffers still exist
    fused, plain = _norm_pair(norm, _layer("layer", 1))
    z = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    a, b = _norm_step(fused, z, None), _norm_step(plain, z, None)
    assert a["path"] == "_BatchNormMixtureBackward"
    assert torch.equal(a["running_mean"], torch.zeros(6))  # type: ignore[arg-type]
    torch.testing.assert_close(a["running_var"], b["running_var"])
    with pytest.raises(ValueError, match="expected 4D input"):  # nn.BatchNorm2d's own error
        fused.act.forward_batchnorm(torch.randn(4, 6, 5), nn.BatchNorm2d(6))


def test_backward_under_autocast_matches_backward_outside() -> None:
    grads = []
    for inside in (False, True):
        fused, _ = _norm_pair(nn.BatchNorm2d(6), _layer("channel", 1, mode="blend"))
        z = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(2))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            out = fused(z, None)
            if inside:
                out.sum().backward()
        if not inside:
            out.sum().backward()
        grads.append(fused.act.logits.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("path", ["closed_form", "batchnorm"])
def test_second_derivatives_fail_loudly(path: str) -> None:
    fused, _ = _norm_pair(nn.BatchNorm2d(6), _layer("layer", 1, mode="blend"))
    z = torch.randn(4, 6, 3, 3, requires_grad=True)
    out = fused(z, None) if path == "batchnorm" else fused.act(z)
    (grad,) = torch.autograd.grad(out.square().sum(), z, create_graph=True)
    with pytest.raises(RuntimeError):  # instead of a silently incomplete second derivative
        torch.autograd.grad(grad.sum(), fused.act.logits)


@pytest.mark.parametrize("case", ["hook_on_norm", "hook_on_layer", "residual_dtype"])
def test_forward_batchnorm_leaves_hooks_and_mixed_dtypes_to_the_modules(case: str) -> None:
    fused, plain = _norm_pair(nn.BatchNorm2d(6), _layer("layer", 1))
    seen: list[str] = []
    for model in (fused, plain):
        module = model.norm if case == "hook_on_norm" else model.act
        if case != "residual_dtype":
            module.register_forward_hook(lambda *args: seen.append("hook"))
    z = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(5))
    res = torch.randn(4, 6, 3, 3, dtype=torch.float64 if case == "residual_dtype" else None)
    a, b = _norm_step(fused, z, res), _norm_step(plain, z, res)
    assert a["path"] == b["path"] != "_BatchNormMixtureBackward"
    assert len(seen) == (0 if case == "residual_dtype" else 2)  # the hook ran in both
    torch.testing.assert_close(a["out"], b["out"])


def test_channel_dim_cannot_be_the_batch_dimension() -> None:
    layer = FlexAct(granularity="channel", num_channels=4, channel_dim=0)
    with pytest.raises(ValueError, match="not a non-batch dimension"):
        layer(torch.randn(4, 6))


@pytest.mark.parametrize("fused_norm", [False, True])
def test_frozen_selection_logits_still_give_input_gradients(fused_norm: bool,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    grads = []
    for general in (False, True):
        fused, _ = _norm_pair(nn.BatchNorm2d(6), _layer("channel", 1, mode="blend"))
        fused.act.logits.requires_grad_(False)  # the weights' inner products are skipped
        if general:
            monkeypatch.setattr(kernels, "basis_rows", lambda candidates: None)
        z = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(6),
                        requires_grad=True)
        out = fused(z, None) if fused_norm else fused.act(z)
        (out * torch.linspace(-1, 1, 9).reshape(3, 3)).sum().backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1])
