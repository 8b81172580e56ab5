"""Activation expressions: grammar, safety, canonical forms, schemas, and use as candidates."""

from __future__ import annotations

import io

import pytest
import torch

from flexact import ConfigError, FlexAct, FlexActSpec, freeze_selection, get_activation
from flexact.backbones import MLP
from flexact.nn.canonical import SCHEMAS, canonical, expand_schema, fingerprint
from flexact.nn.expressions import BINARY, UNARY, Expression, ExpressionError, parse

EXTREMES = torch.tensor([-1e4, -3e3, -100.0, -20.0, -1.0, -1e-4, 0.0, 1e-4, 1.0, 20.0, 100.0,
                         3e3, 1e4])


def test_the_grammar_has_the_operators_the_issue_names() -> None:
    assert len(UNARY) >= 20
    for name in ("identity", "neg", "abs", "square", "cube", "exp", "log1p_abs", "sin", "cos",
                 "sinc", "erf", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu",
                 "softplus", "softsign", "silu", "gelu", "hard_sigmoid", "zero", "one"):
        assert name in UNARY
    assert set(BINARY) >= {"add", "sub", "mul", "div", "max", "min"}


@pytest.mark.parametrize(("text", "expected"), [
    ("add(tanh(x),sin(x))", lambda x: torch.tanh(x) + torch.sin(x)),
    (" max( relu(x) , neg(x) ) ", lambda x: torch.maximum(torch.relu(x), -x)),
    ("wadd(gelu(x),sin(x),0.1)", lambda x: torch.nn.functional.gelu(x) + 0.1 * torch.sin(x)),
    ("mul(0.5,square(x))", lambda x: 0.5 * x * x),
    ("div(x,one(x))", lambda x: x),
    ("x", lambda x: x),
])
def test_expressions_compute_what_they_say(text: str, expected) -> None:
    x = torch.linspace(-4, 4, 81)
    torch.testing.assert_close(Expression(text)(x), expected(x))


@pytest.mark.parametrize(("text", "token"), [
    ("add(tanh(x),foo(x))", "'foo'"),
    ("add(tanh(x))", "','"),
    ("relu(x", "ends early"),
    ("relu(x))", "')'"),
    ("relu(x) $", "'$'"),
    ("wadd(x,x,relu(x))", "weight"),
    ("", "non-empty"),
])
def test_malformed_expressions_name_the_bad_token_and_list_the_operators(text: str,
                                                                        token: str) -> None:
    with pytest.raises(ExpressionError) as err:
        parse(text)
    assert token in str(err.value)
    if "unknown operator" in str(err.value):
        assert "softsign" in str(err.value) and "wadd" in str(err.value)


def test_an_expression_is_a_candidate_wherever_a_name_is() -> None:
    layer = FlexAct(candidates=["relu", "add(tanh(x),sin(x))"])
    assert isinstance(layer.candidates[1], Expression)
    spec = FlexActSpec(candidates=["sin(x)", "tanh"])
    assert spec.candidates[0] == "sin(x)"
    net = MLP(4, hidden=(8,), activation="mul(x,sigmoid(x))")
    assert any(isinstance(m, Expression) for m in net.modules())
    with pytest.raises(ConfigError, match="bad token 'sine'"):
        FlexActSpec(candidates=["sine(x)", "relu"])
    with pytest.raises(ConfigError, match="no keyword arguments"):
        get_activation("sin(x)", scale=2)


def test_a_trained_expression_candidate_is_picked_and_freezes_to_that_function() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 1)
    y = torch.sin(3 * x)
    layer = FlexAct(candidates=["relu", "sin(x)", "square(x)"], tau=1.0)
    scale = torch.nn.Parameter(torch.tensor([[1.0]]))
    opt = torch.optim.Adam([*layer.parameters(), scale], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = ((layer(x @ scale) - y) ** 2).mean()
        loss.backward()
        opt.step()
    assert layer.selected() == ["sin(x)"]
    frozen = freeze_selection(torch.nn.Sequential(layer))
    assert isinstance(frozen[0], Expression) and frozen[0].expression == "sin(x)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", [*UNARY, *BINARY, "wadd"])
def test_every_operator_is_finite_with_finite_gradients_at_extreme_inputs(name: str,
                                                                         dtype) -> None:
    if name in UNARY:
        texts = [f"{name}(x)", f"{name}({name}({name}(x)))", f"{name}(cube(exp(x)))"]
    elif name in BINARY:
        texts = [f"{name}(x,x)", f"{name}(cube(x),exp(x))", f"{name}(x,zero(x))",
                 f"{name}({name}(square(x),cube(x)),{name}(exp(x),x))"]
    else:
        texts = ["wadd(cube(x),exp(x),0.5)", "wadd(wadd(square(x),x,3),cube(x),-2)"]
    for text in texts:
        x = EXTREMES.to(dtype).requires_grad_(True)
        y = Expression(text)(x)
        (grad,) = torch.autograd.grad(y.float().sum(), x)
        assert torch.isfinite(y).all(), (text, y)
        assert torch.isfinite(grad).all(), (text, grad)


def test_canonical_forms_merge_equivalent_spellings() -> None:
    assert canonical("abs(relu(x))") == "relu(x)"
    assert canonical("add(sin(x),tanh(x))") == canonical("add(tanh(x), sin(x))")
    assert canonical("max(relu(x),x)") == "relu(x)"
    assert canonical("sub(relu(x),relu(neg(x)))") == "x"
    assert canonical("mul(one(x),gelu(x))") == "gelu(x)"
    assert canonical("zero(sin(x))") == "zero(x)"
    assert canonical("neg(neg(tanh(x)))") == "tanh(x)"
    # Distinct functions stay distinct.
    assert canonical("add(sin(x),x)") != canonical("sub(sin(x),x)")
    assert fingerprint("add(sin(x),x)") != fingerprint("sub(sin(x),x)")
    assert fingerprint(canonical("min(neg(x),x)")) == fingerprint("min(neg(x),x)")


def test_a_schema_space_has_no_functional_duplicates() -> None:
    space = expand_schema("binary_unary")
    assert len(space) > 1000
    keys = {fingerprint(text) for text in space}
    assert len(keys) == len(space)
    assert all(canonical(text) == text for text in space[::97])
    small = expand_schema("unary(unary(x))", unary=["relu", "abs", "neg", "identity"])
    # relu∘abs = abs, abs∘neg = abs, ...: 4×4 spellings, only these functions.
    assert set(small) == {"x", "neg(x)", "abs(x)", "relu(x)", "neg(abs(x))", "neg(relu(x))",
                          "relu(neg(x))"}


def test_schema_draws_are_seeded_and_bad_schemas_are_clear_errors() -> None:
    a = expand_schema("unary_unary", limit=20, seed=1)
    assert a == expand_schema("unary_unary", limit=20, seed=1) and len(a) == 20
    assert a != expand_schema("unary_unary", limit=20, seed=2)
    with pytest.raises(ExpressionError, match=r"unknown schema 'bogus'.*binary_unary"):
        expand_schema("bogus")
    with pytest.raises(ExpressionError, match="unknown unary operator 'sine'"):
        expand_schema("unary", unary=["sine"])
    with pytest.raises(ExpressionError, match="no expression"):
        expand_schema("unary", unary=[])
    assert set(SCHEMAS) >= {"unary", "unary_unary", "binary_unary"}


def test_expressions_trace_export_to_onnx_and_compile_without_graph_breaks() -> None:
    text = "wadd(max(sinc(x),softsign(x)),div(erf(x),log1p_abs(x)),0.1)"
    module = Expression(text)
    x = torch.randn(3, 5)
    traced = torch.jit.trace(module, x)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), module(x))
    onnx = pytest.importorskip("onnx")
    texts = [f"{u}(x)" for u in UNARY] + [f"{b}(x,sin(x))" for b in BINARY] + [text]
    for expr in texts:
        out = io.BytesIO()
        torch.onnx.export(Expression(expr), (x,), out, dynamo=False)
        onnx.checker.check_model(onnx.load_from_string(out.getvalue()))
    explained = torch._dynamo.explain(Expression(text))(x)
    assert explained.graph_break_count == 0
    compiled = torch.compile(Expression(text), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), module(x))


EXPRESSION_CONFIG = """\
seed_everything: 0
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
model:
  class_path: FlexActClassifier
  init_args:
    backbone:
      class_path: flexact.backbones.MLP
      init_args: {in_features: 10, hidden: [16], activation: "wadd(gelu(x),sin(x),0.1)"}
    hidden_features: 8
    flexact: {candidates: [relu, "sin(x)", "add(tanh(x),x)"]}
data:
  class_path: TeacherDataModule
  init_args: {n_samples: 400, batch_size: 64}
"""


def test_expressions_in_a_yaml_config_fit_checkpoint_and_export(tmp_path) -> None:
    from flexact.cli import build_cli
    from flexact.cli.export import export_checkpoint
    from flexact.modules import FlexActClassifier

    config = tmp_path / "expr.yaml"
    config.write_text(EXPRESSION_CONFIG)
    cli = build_cli(["fit", "--config", str(config), "--trainer.default_root_dir",
                     str(tmp_path)])
    layer = cli.model.head.flexact
    assert layer.candidate_names == ("relu", "sin(x)", "add(tanh(x),x)")
    assert any(isinstance(m, Expression) and m.expression == "wadd(gelu(x),sin(x),0.1)"
               for m in cli.model.backbone.modules())
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    reloaded = FlexActClassifier.load_from_checkpoint(ckpt)
    assert reloaded.head.flexact.selected() == layer.selected()
    script, onnx_file = export_checkpoint(ckpt, tmp_path / "model.pt", [10],
                                          tmp_path / "model.onnx")
    assert onnx_file is not None and onnx_file.stat().st_size > 0
    x = torch.randn(5, 10)
    reloaded.eval()
    torch.testing.assert_close(torch.jit.load(str(script))(x), reloaded(x))
