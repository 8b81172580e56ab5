from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from torch import nn

from flexact import ConfigError, FlexAct, flexact_layers, freeze_selection, swap_activations
from flexact.cli import build_cli, main
from flexact.modules import FlexActClassifier, FlexActRegressor
from flexact.tools.profiling import saved_bytes

from .conftest import REPO


def _randomize(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, layer in flexact_layers(model):
        with torch.no_grad():
            layer.logits.copy_(3 * torch.randn(layer.logits.shape, generator=gen))


def test_swap_counts_and_reports_every_activation_site() -> None:
    resnet = torchvision.models.resnet18()
    report = swap_activations(resnet)
    assert len(report) == 9 and report[0].name == "relu" and report[0].replaced == "ReLU"
    assert not any(isinstance(m, nn.ReLU) for name, m in resnet.named_modules()
                   if ".candidates." not in name)
    vgg = torchvision.models.vgg11()
    assert len(swap_activations(vgg)) == 10  # 8 conv + 2 classifier ReLUs (inplace ones too)
    mobilenet = torchvision.models.mobilenet_v3_small()
    report = swap_activations(mobilenet)
    replaced = {r.replaced for r in report}
    assert replaced == {"ReLU", "Hardswish"}  # SE gates (Hardsigmoid) are left alone
    assert any(isinstance(m, nn.Hardsigmoid) for m in mobilenet.modules())
    mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 1))
    assert [r.name for r in swap_activations(mlp)] == ["1", "3"]
    assert swap_activations(mlp) == []  # FlexAct layers are never swapped again


def test_swap_include_exclude_and_channels() -> None:
    resnet = torchvision.models.resnet18()
    report = swap_activations(resnet, include=["layer4.*"])
    assert [r.name for r in report] == ["layer4.0.relu", "layer4.1.relu"]
    resnet = torchvision.models.resnet18()
    report = swap_activations(resnet, exclude=["layer1.*", "relu"])
    assert len(report) == 6 and all(not r.name.startswith("layer1") for r in report)
    resnet = torchvision.models.resnet18()
    report = swap_activations(resnet, granularity="channel",
                              example_input=torch.randn(2, 3, 32, 32), tau=0.5)
    assert [r.num_channels for r in report] == [64, 64, 64, 128, 128, 256, 256, 512, 512]
    layer = resnet.get_submodule("layer3.0.relu")
    assert isinstance(layer, FlexAct) and layer.logits.shape == (256, 5) and layer.tau == 0.5
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    with pytest.raises(ConfigError, match="example_input"):
        swap_activations(torchvision.models.resnet18(), granularity="channel")


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    return saved_bytes(lambda: model(x))


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_multilayer_cifar_resnet18_saved_bytes(granularity: str) -> None:
    """FlexAct at all 17 sites of a CIFAR ResNet18: ≤ 1.05× the ReLU network's saved bytes.

    Every site follows a batch norm, so it takes the fused path (FlexAct.forward_batchnorm),
    which keeps no copy of its input: swapped and built-in sites alike, whatever
    ``compact_memory`` says. Batch 32 makes activations, not the weights, dominate the count.
    """
    from flexact.backbones import cifar_resnet18

    torch.manual_seed(0)
    x = torch.randn(32, 3, 32, 32)
    baseline = _saved_bytes(cifar_resnet18(activation="relu"), x)
    default, full = cifar_resnet18(activation="relu"), cifar_resnet18(activation="relu")
    assert len(swap_activations(default, granularity=granularity,  # type: ignore[arg-type]
                                example_input=x)) == 17
    swap_activations(full, granularity=granularity, example_input=x,  # type: ignore[arg-type]
                     compact_memory=False)
    ratios = [_saved_bytes(model, x) / baseline for model in (default, full)]
    assert all(1.0 < r <= 1.05 for r in ratios), ratios
    built = cifar_resnet18(activation="flexact")  # the backbone's own FlexAct sites agree
    assert _saved_bytes(built, x) / baseline == pytest.approx(ratios[0], rel=1e-3)


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_compact_memory_halves_the_extra_bytes_without_fusion(granularity: str) -> None:
    """A FlexAct keeps its input for backward where a ReLU keeps its output (which the next
    convolution keeps anyway): one extra activation per site, in float32 1.4× here.
    ``compact_memory`` (swap_activations' default) keeps that input in bf16."""

    def net() -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
        return nn.Sequential(*layers)

    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    baseline = _saved_bytes(net(), x)
    default, full = net(), net()
    swap_activations(default, granularity=granularity,  # type: ignore[arg-type]
                     example_input=x)
    swap_activations(full, granularity=granularity, example_input=x,  # type: ignore[arg-type]
                     compact_memory=False)
    default_ratio = _saved_bytes(default, x) / baseline
    full_ratio = _saved_bytes(full, x) / baseline
    assert 1.0 < default_ratio <= 1.3 < full_ratio, (default_ratio, full_ratio)


def test_compact_memory_gradients_match_full_precision() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 8, requires_grad=True)
    full, compact = FlexAct(), FlexAct(compact_memory=True)
    compact.load_state_dict(full.state_dict())
    grads = []
    for layer in (full, compact):
        torch.manual_seed(2)
        out = layer(x)
        (out * torch.linspace(-1, 1, 8)).sum().backward()
        grads.append((x.grad.clone(), layer.logits.grad.clone()))  # type: ignore[union-attr]
        x.grad = None
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=2e-2, atol=2e-2)
    assert not torch.equal(grads[1][1], grads[0][1])  # it really used the rounded input


def test_freeze_matches_eval_outputs_and_removes_flexact() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    for granularity in ("layer", "channel"):
        model = torchvision.models.resnet18(num_classes=10)
        swap_activations(model, granularity=granularity,  # type: ignore[arg-type]
                         example_input=x, candidates=["relu", "tanh", "gelu", "adaptive_relu"])
        _randomize(model)
        model.eval()
        frozen = freeze_selection(model)
        assert not any(isinstance(m, FlexAct) for m in frozen.modules())
        assert any(isinstance(m, FlexAct) for m in model.modules())  # the original is intact
        torch.testing.assert_close(frozen(x), model(x), rtol=0, atol=1e-6)
    mlp = nn.Sequential(nn.Linear(3, 4), FlexAct(candidates=["relu", "sigmoid"]))
    with torch.no_grad():
        mlp[1].logits.copy_(torch.tensor([0.0, 2.0]))
    assert isinstance(freeze_selection(mlp)[1], nn.Sigmoid)


def test_blend_mode_is_noise_free_softmax_mixture() -> None:
    layer = FlexAct(candidates=["relu", "tanh"], mode="blend")
    with torch.no_grad():
        layer.logits.copy_(torch.tensor([0.3, -0.4]))
    x = torch.randn(6, 3)
    p = torch.softmax(layer.logits.detach(), -1)
    torch.testing.assert_close(layer(x), p[0] * torch.relu(x) + p[1] * torch.tanh(x))
    torch.testing.assert_close(layer(x), layer(x))
    with pytest.raises(ConfigError, match="mode"):
        FlexAct(mode="sample")  # type: ignore[arg-type]


def test_fixed_activation_baseline_through_the_module() -> None:
    model = FlexActRegressor(in_features=4, flexact={"candidates": ["tanh"]})
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), torch.tanh(model.head.linear(x)))


@pytest.mark.slow
def test_multilayer_flexact_cifar_resnet_trains_without_nan(tmp_path: Path) -> None:
    """FlexAct at all 17 sites of a CIFAR ResNet18 plus the head, 200 CPU steps, α = 0.3."""
    from flexact.backbones import CifarResNet

    L.seed_everything(0)
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (128,), generator=gen)
    x = torch.randn(128, 3, 8, 8, generator=gen) * 0.5  # 8×8 keeps 200 steps quick
    x[torch.arange(128), y % 3, :, :4] += 1.5  # class pattern: a bright half in one channel
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8,
                                         shuffle=True)
    model = FlexActClassifier(backbone=CifarResNet(activation="relu"), num_outputs=4,
                              hidden_features=32, swap_backbone=True, kl_reduction="mean",
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    assert len(model.model.swaps) == 17

    class NaNWatch(L.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                               outputs: object, batch: object, batch_idx: int) -> None:
            loss = outputs["loss"]  # type: ignore[index]
            assert torch.isfinite(loss), f"non-finite loss at step {trainer.global_step}"
            self.losses.append(float(loss))

    watch = NaNWatch()
    trainer = L.Trainer(max_steps=200, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[watch])
    trainer.fit(model, loader)
    assert trainer.global_step == 200
    assert sum(watch.losses[-50:]) < sum(watch.losses[:50])  # it learns, not just survives
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_export_runs_without_flexact(tmp_path: Path) -> None:
    config = str(REPO / "configs" / "synthetic.yaml")
    cli = build_cli([
        "fit", "--config", config, "--trainer.max_epochs", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--data.n_train", "256",
        "--model.hidden_features", "6", "--model.flexact.granularity", "channel",
        "--model.flexact.candidates", "[relu,tanh,adaptive_gumbel,identity]",
    ])
    assert cli.trainer.checkpoint_callback is not None
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    out = tmp_path / "frozen.pt"
    main(["export", ckpt, "--out", str(out)])
    x = torch.randn(16, 4)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        f"m = torch.jit.load({str(out)!r})\n"
        f"y = m(torch.load({str(tmp_path / 'x.pt')!r}))\n"
        "assert not any(n == 'flexact' or n.startswith('flexact.') for n in sys.modules)\n"
        f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    model = cli.model.eval()
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "missing.ckpt")])
    assert exit_info.value.code == 2


def test_selection_kl_mean_reduction_divides_by_layer_count() -> None:
    from flexact import selection_kl

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), FlexAct(), nn.Linear(4, 4), FlexAct(), FlexAct())
    model(torch.randn(16, 3))
    total = selection_kl(model)
    assert total.item() > 0
    torch.testing.assert_close(selection_kl(model, "mean"), total / 3)


def test_export_onnx(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    config = str(REPO / "configs" / "synthetic.yaml")
    cli = build_cli([
        "fit", "--config", config, "--trainer.max_steps", "5",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--data.n_train", "128",
        "--model.hidden_features", "6",
    ])
    assert cli.trainer.checkpoint_callback is not None
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    main(["export", ckpt, "--out", str(tmp_path / "m.pt"), "--onnx", str(tmp_path / "m.onnx")])
    graph = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert "Gemm" in ops or "MatMul" in ops
    assert [i.name for i in graph.graph.input] == ["input"]


def test_share_selection_ties_every_layer_to_one_set_of_logits() -> None:
    from flexact import share_selection
    from flexact.nn.params import parameter_groups

    torch.manual_seed(0)
    cands = ["relu", "sigmoid", "tanh"]
    mlp = nn.Sequential(nn.Linear(3, 5), FlexAct(candidates=cands), nn.Linear(5, 5),
                        FlexAct(candidates=cands), nn.Linear(5, 1), FlexAct(candidates=cands))
    assert share_selection(mlp) == 3
    logits = [layer.logits for _, layer in flexact_layers(mlp)]
    assert all(p is logits[0] for p in logits)
    groups = parameter_groups(mlp)
    assert sum(len(g["params"]) for g in groups) == len(list(mlp.parameters())) == 7
    mlp(torch.randn(8, 3)).sum().backward()
    assert logits[0].grad is not None and logits[0].grad.abs().sum() > 0  # from all three
    with torch.no_grad():
        logits[0].copy_(torch.tensor([0.0, 0.0, 3.0]))
    frozen = freeze_selection(mlp)
    assert [type(m) for m in frozen if not isinstance(m, nn.Linear)] == [nn.Tanh] * 3
    mixed = nn.Sequential(FlexAct(candidates=cands), FlexAct(candidates=["relu", "tanh"]))
    with pytest.raises(ConfigError, match="same candidates"):
        share_selection(mixed)
    per_channel = nn.Sequential(FlexAct(candidates=cands),
                                FlexAct(candidates=cands, granularity="channel", num_channels=4))
    with pytest.raises(ConfigError, match="per channel"):
        share_selection(per_channel)
    assert share_selection(nn.Linear(2, 2)) == 0


def test_share_selection_through_the_module_trains_and_reloads_tied() -> None:
    def build() -> FlexActRegressor:
        backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        return FlexActRegressor(backbone=backbone, in_features=8, hidden_features=4,
                                swap_backbone=True, share_selection=True)

    torch.manual_seed(0)
    model = build()
    layers = [layer for _, layer in flexact_layers(model.model)]
    assert len(layers) == 3 and all(layer.logits is layers[0].logits for layer in layers)
    optimizer = model.configure_optimizers()
    entries = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(entries) == len({id(p) for p in entries}) == len(list(model.parameters()))
    before = layers[0].logits.detach().clone()
    model.train()
    loss = model(torch.randn(16, 4)).pow(2).mean()
    loss.backward()
    optimizer.step()
    assert not torch.equal(layers[0].logits.detach(), before)
    assert all(torch.equal(layer.logits, layers[0].logits) for layer in layers)
    reloaded = build()
    reloaded.load_state_dict(model.state_dict())
    tied = [layer.logits for _, layer in flexact_layers(reloaded.model)]
    torch.testing.assert_close(tied[0], layers[0].logits)
    assert all(p is tied[0] for p in tied)
