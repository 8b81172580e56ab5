"""The shape of the package: the core stands without Lightning, one spec, one candidate table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import flexact
from flexact import ConfigError, FlexAct, FlexActHead, FlexActSpec, freeze_selection
from flexact.modules import FlexActClassifier, FlexActRegressor
from flexact.nn import basis, registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flexact"


def test_the_core_imports_no_lightning() -> None:
    code = (
        "import sys, flexact, flexact.nn, flexact.backbones, flexact.tools.profiling\n"
        "import flexact.nn.canonical, flexact.search.space\n"
        "import flexact.probe.fisher, flexact.probe.surrogate, flexact.probe.results\n"
        "import flexact.probe.sites, flexact.probe.prior, flexact.probe.report\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'lightning', 'pytorch_lightning', 'torchmetrics', 'jsonargparse'})\n"
        "print(' '.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    assert result.stdout.strip() == ""


def test_the_lightning_layer_does_import_lightning() -> None:
    """The control: the same probe sees Lightning where it is used."""
    code = "import sys, flexact.modules; print('lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    assert result.stdout.strip() == "True"


def test_every_module_of_the_package_is_short() -> None:
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 300}
    assert not long, f"modules over 300 lines: {long}"


def test_the_repository_cites_only_its_own_files() -> None:
    outside = ("METHOD.md", "DESIGN.md", "../shared")
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.split()
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".toml", ".sh"} or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{name}: {word}" for word in outside
                      if word in text and name != "tests/test_structure.py"]
    assert not offenders
    assert (ROOT / "docs" / "method.md").is_file()


# ---------------------------------------------------------------- one spec


def test_spec_is_checked_once_with_clear_errors() -> None:
    with pytest.raises(ConfigError, match="tau must be a finite number > 0"):
        FlexActSpec(tau=0)
    with pytest.raises(ConfigError, match="unknown FlexAct setting"):
        FlexAct(kl_lamda=0.3)
    with pytest.raises(ConfigError, match="prior must hold 2"):
        FlexActSpec(candidates=["relu", "tanh"], prior=[1.0])
    with pytest.raises(ConfigError, match="candidate_kwargs names"):
        FlexActSpec(candidates=["relu"], candidate_kwargs={"leaky_relu": {}})


def test_one_spec_builds_layer_head_and_network_alike() -> None:
    spec = FlexActSpec(candidates=["relu", "leaky_relu"], tau=0.4, kl_lambda=0.2,
                       candidate_kwargs={"leaky_relu": {"negative_slope": 0.3}})
    layer = FlexAct(spec)
    head = FlexActHead(3, 2, 5, spec)
    for built in (layer, head.flexact):
        assert built.candidate_names == ("relu", "leaky_relu")
        assert built.tau == pytest.approx(0.4) and built.kl_lambda == pytest.approx(0.2)
        assert built.candidates[1].negative_slope == pytest.approx(0.3)
    assert FlexAct(["relu", "tanh"]).candidate_names == ("relu", "tanh")  # nn-style sugar
    assert FlexAct(spec, tau=0.9).tau == pytest.approx(0.9)  # a field replaced


def test_module_spec_reaches_head_and_swapped_backbone_sites() -> None:
    backbone = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU())
    spec = {"candidates": ["relu", "tanh", "identity"], "tau": 0.5,
            "candidate_kwargs": None}
    module = FlexActRegressor(backbone=backbone, in_features=6, hidden_features=3,
                              flexact=spec, swap_backbone=True)
    layers = dict(flexact.flexact_layers(module.model))
    assert set(layers) == {"backbone.1", "backbone.3", "head.flexact"}
    assert {layer.candidate_names for layer in layers.values()} == {("relu", "tanh", "identity")}
    assert module.hparams["flexact"]["candidates"] == ["relu", "tanh", "identity"]
    # The backbone's sites may be set apart.
    other = FlexActRegressor(backbone=nn.Sequential(nn.Linear(4, 6), nn.ReLU()), in_features=6,
                             flexact=spec, swap_backbone=True,
                             backbone_flexact=FlexActSpec(candidates=["relu", "sigmoid"]))
    assert other.model.backbone[1].candidate_names == ("relu", "sigmoid")
    assert other.model.head.flexact.candidate_names == ("relu", "tanh", "identity")


def test_the_module_holds_a_plain_network() -> None:
    module = FlexActClassifier(in_features=4, num_outputs=3, hidden_features=5)
    assert type(module.model).__module__ == "flexact.nn.network"
    assert module.head is module.model.head and module.backbone is module.model.backbone
    assert all(key.startswith("model.") for key in module.state_dict())
    x = torch.randn(7, 4)
    module.eval()
    torch.testing.assert_close(module(x), module.model(x))


# ---------------------------------------------------------------- one candidate table


def test_a_registered_candidate_supplies_its_closed_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    class Shifted(nn.Module):  # relu(x) + 0.5·x: a combination of the basis
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) + 0.5 * x

    class Plain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) + 0.5 * x

    derivative_calls: list[int] = []

    def derivative(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        derivative_calls.append(1)
        return (x > 0).to(x.dtype) + 0.5

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    flexact.register_activation("shifted", derivative=derivative,
                                basis=lambda m: (1.0, 0.5, 0.0, 0.0, 0.0),
                                plain=lambda m: Plain())(Shifted)
    assert basis.basis_row(Shifted()) == (1.0, 0.5, 0.0, 0.0, 0.0)
    layer = FlexAct(["shifted", "tanh"])
    x = torch.randn(16, 3)
    # The closed form takes the registered basis (the general path would call forward).
    assert basis.basis_rows(layer.candidates) is not None
    out = flexact.mixture(x, torch.tensor([0.25, 0.75]), layer.candidates)
    torch.testing.assert_close(out, 0.25 * Shifted()(x) + 0.75 * torch.tanh(x))
    layer.gradient_norms(x)
    assert derivative_calls  # the regularizer used the registered derivative
    frozen = freeze_selection(nn.Sequential(layer))
    assert isinstance(frozen[0], (Plain, nn.Tanh))
    with torch.no_grad():
        layer.logits.copy_(torch.tensor([5.0, 0.0]))
    assert isinstance(freeze_selection(nn.Sequential(layer))[0], Plain)


def test_a_subclass_of_a_builtin_gets_no_closed_form() -> None:
    class MyReLU(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    assert basis.basis_row(nn.ReLU()) is not None
    assert basis.basis_row(MyReLU()) is None


def test_top_level_names_are_the_cores_and_help_needs_no_torch() -> None:
    assert set(flexact.__all__) == {"ConfigError", "__version__", *flexact.nn.__all__}
    code = ("import sys\nsys.argv = ['flexact', '--help']\nfrom flexact.__main__ import run\n"
            "run()\nprint('torch' in sys.modules, 'lightning' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    assert "subcommands" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False False"
