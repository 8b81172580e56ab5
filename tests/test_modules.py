from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flexact import ConfigError, FlexAct, flexact_layers
from flexact.callbacks import TemperatureAnnealing
from flexact.datamodules import SyntheticDataModule
from flexact.modules import FlexActClassifier, FlexActRegressor


def _trainer(tmp_path: Path, **kwargs: object) -> L.Trainer:
    defaults: dict[str, object] = dict(
        default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _blobs(n: int = 256, classes: int = 3, dim: int = 8, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, dim, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centers[y] + torch.randn(n, dim, generator=gen)
    return TensorDataset(x, y)


class Features(nn.Module):
    """A user backbone that advertises its feature size."""

    out_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_regressor_learns_synthetic_relu(tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = SyntheticDataModule(truth="relu", n_train=1024, n_val=256, batch_size=64)
    model = FlexActRegressor(in_features=4, alpha=0.3,
                             optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    trainer = _trainer(tmp_path, max_epochs=8)  # 128 steps: the selection's rate grows over them
    trainer.fit(model, dm)
    dm.setup("test")
    x, y = dm.splits["test"].tensors
    model.eval()
    with torch.no_grad():
        mse = nn.functional.mse_loss(model(x), y).item()
    assert mse < 0.5 * y.var().item()  # far better than predicting the mean
    assert model.head.flexact.selected()[0] in {"relu", "leaky_relu"}
    assert "train_regularizer" in trainer.logged_metrics and "val_mse" in trainer.logged_metrics


def test_backbone_feature_inference() -> None:
    resnet = torchvision.models.resnet18(num_classes=7)
    model = FlexActClassifier(backbone=resnet, num_outputs=10, hidden_features=32)
    assert isinstance(model.backbone.fc, nn.Identity)
    assert model.head.linear.in_features == 512
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=5)
    model = FlexActClassifier(backbone=mobilenet, num_outputs=4)
    assert model.head.linear.in_features == 1024

    assert FlexActClassifier(backbone=Features(), num_outputs=3).head.linear.in_features == 16
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    model = FlexActClassifier(backbone=conv, num_outputs=3, example_input_shape=[1, 6, 6])
    assert model.head.linear.in_features == 4 * 4 * 4
    # A backbone that does not tell its size: the head's first layer is sized at the first batch.
    lazy = FlexActClassifier(backbone=nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()),
                             num_outputs=3, hidden_features=8)
    assert not lazy.model.is_materialized()
    assert lazy(torch.randn(2, 1, 6, 6)).shape == (2, 3)
    assert lazy.head.linear.in_features == 4 * 4 * 4 and lazy.model.is_materialized()
    with pytest.raises(ConfigError, match="num_outputs"):
        FlexActClassifier(in_features=3)
    with pytest.raises(ConfigError, match="num_classes >= 2"):
        FlexActClassifier(in_features=3, num_outputs=1)
    with pytest.raises(ConfigError, match="without a backbone the head needs in_features"):
        FlexActClassifier(num_classes=3)


def test_classifier_defaults_to_the_penultimate_head_and_takes_num_classes() -> None:
    model = FlexActClassifier(in_features=12, num_classes=4)
    head = model.model.head
    assert head.linear.out_features == 12 and head.output is not None  # FlexAct not on logits
    assert head.output.out_features == 4 and model.num_outputs == 4
    assert FlexActClassifier(in_features=12, num_classes=4, hidden_features=None
                             ).model.head.output is None  # the single-layer form on request
    assert FlexActRegressor(in_features=12).model.head.output is None  # regression: the paper's
    with pytest.raises(ConfigError, match="disagree"):
        FlexActClassifier(in_features=12, num_classes=4, num_outputs=5)


def test_a_lazily_sized_head_is_sized_from_the_data_before_training(tmp_path: Path) -> None:
    """DDP refuses unsized parameters, so setup sizes the head from one validation batch."""
    from flexact.datamodules.teacher import TeacherDataModule

    sized: list[bool] = []

    class Probe(L.Callback):
        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            sized.append(pl_module.model.is_materialized())

    model = FlexActClassifier(backbone=nn.Sequential(nn.Linear(10, 6), nn.Tanh()),
                              num_classes=2)
    data = TeacherDataModule(depth=1, n_samples=200, batch_size=16)
    _trainer(tmp_path, max_steps=2, callbacks=[Probe()]).fit(model, data)
    assert sized == [True] and model.head.linear.in_features == 6


def test_hparams_skip_module_arguments_but_keep_subclass_ones() -> None:
    class Custom(FlexActClassifier):
        def __init__(self, extra: int = 5, **kwargs: object) -> None:
            super().__init__(**kwargs)  # type: ignore[arg-type]

    model = Custom(extra=9, backbone=Features(), num_outputs=3, alpha=0.1)
    assert "backbone" not in model.hparams
    assert model.hparams.extra == 9 and model.hparams.alpha == 0.1


def test_selection_parameters_get_no_weight_decay() -> None:
    model = FlexActRegressor(
        backbone=nn.Sequential(nn.Linear(4, 6), nn.PReLU()), in_features=6,
        flexact={"candidates": ["relu", "swish_beta"]},
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.5),
    )
    optimizer = model.configure_optimizers()
    by_id = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert by_id[id(model.head.flexact.logits)] == 0.0
    assert by_id[id(model.head.flexact.candidates[1].beta)] == 0.0
    assert by_id[id(model.backbone[1].weight)] == 0.0  # PReLU slope
    assert by_id[id(model.head.linear.weight)] == 0.5
    assert len(by_id) == sum(1 for _ in model.parameters())
    decayed = FlexActRegressor(in_features=4, selection_weight_decay=True,
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.5))
    groups = decayed.configure_optimizers().param_groups
    assert all(g["weight_decay"] == 0.5 for g in groups)


def test_selection_logits_get_their_own_learning_rate() -> None:
    def lrs(model: FlexActRegressor, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}

    sgd = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    model = FlexActRegressor(in_features=4, optimizer=sgd,
                             lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5))
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert lrs(model, optimizer) == {"model.head.linear.weight": 0.1,
                                     "model.head.linear.bias": 0.1,
                                     "model.head.flexact.logits": pytest.approx(0.5)}  # 5×
    optimizer.step()
    scheduler.step()  # the scheduler's base is the scaled rate: the ratio stays 5
    assert lrs(model, optimizer)["model.head.flexact.logits"] == pytest.approx(0.25)
    assert lrs(model, optimizer)["model.head.linear.weight"] == pytest.approx(0.05)
    paper = FlexActRegressor(in_features=4, optimizer=sgd, selection_lr_scale=1.0)
    assert set(lrs(paper, paper.configure_optimizers()).values()) == {0.1}
    with pytest.raises(ValueError, match="selection_lr_scale"):
        from flexact.nn.params import scale_selection_lr
        scale_selection_lr(optimizer, 0.0)


def test_scheduler_is_injected() -> None:
    model = FlexActRegressor(
        in_features=4, lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2)
    )
    config = model.configure_optimizers()
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)


def test_alpha_zero_skips_regularizer_measurement() -> None:
    model = FlexActRegressor(in_features=4, alpha=0.0)
    assert model.head.flexact.regularize is False
    model.train()
    model(torch.randn(8, 4))
    assert model.head.flexact._targets is None


def test_predict_step_returns_class_indices(tmp_path: Path) -> None:
    model = FlexActClassifier(in_features=8, num_outputs=3, hidden_features=16)
    loader = DataLoader(_blobs(32), batch_size=8)
    predictions = _trainer(tmp_path).predict(model, loader)
    assert predictions is not None
    out = torch.cat(predictions)  # type: ignore[arg-type]
    assert out.shape == (32,) and out.dtype == torch.long and int(out.max()) < 3


class ProjectClassifier(FlexActClassifier):
    """A downstream project: overrides one hook, keeps the training step."""

    def configure_models(self) -> None:
        self.backbone = nn.Sequential(nn.Linear(8, 24), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(24, 16), FlexAct(candidates=["relu", "tanh"]),
                                  nn.Linear(16, self.num_outputs))


def test_downstream_subclass_trains_and_reloads(tmp_path: Path) -> None:
    L.seed_everything(1)
    train = DataLoader(_blobs(256), batch_size=32, shuffle=True)
    val = DataLoader(_blobs(64, seed=0), batch_size=32)
    model = ProjectClassifier(num_outputs=3, optimizer=lambda p: torch.optim.Adam(p, lr=0.02))
    checkpoint = ModelCheckpoint(dirpath=tmp_path)
    trainer = _trainer(tmp_path, max_epochs=5, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(model, train, val)
    assert trainer.logged_metrics["val_acc"] > 0.8
    restored = ProjectClassifier.load_from_checkpoint(checkpoint.best_model_path)
    model.eval()
    restored.eval()
    x = next(iter(val))[0]
    assert torch.equal(model(x), restored(x))
    assert isinstance(restored.head[1], FlexAct)


class TauRecorder(L.Callback):
    def __init__(self) -> None:
        self.taus: dict[int, float] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: object, batch_idx: int) -> None:
        self.taus[trainer.global_step] = pl_module.head.flexact.tau


def _annealed_run(tmp_path: Path, max_steps: int, ckpt_path: str | None = None,
                  every: int | None = None) -> tuple[TauRecorder, ModelCheckpoint | None]:
    L.seed_everything(0)
    dm = SyntheticDataModule(n_train=256, n_val=64, batch_size=32)
    model = FlexActRegressor(in_features=4)
    recorder = TauRecorder()
    callbacks: list[L.Callback] = [
        TemperatureAnnealing(start=2.0, end=0.1, total=40), recorder,
    ]
    checkpoint = None
    if every:
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every,
                                     save_top_k=-1)
        callbacks.append(checkpoint)
    trainer = _trainer(tmp_path, max_steps=max_steps, callbacks=callbacks,
                       enable_checkpointing=every is not None, limit_val_batches=0)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return recorder, checkpoint


def test_resume_continues_temperature(tmp_path: Path) -> None:
    full, checkpoint = _annealed_run(tmp_path, max_steps=40, every=16)
    assert checkpoint is not None
    mid = tmp_path / "ckpt" / "epoch=1-step=16.ckpt"
    assert mid.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    resumed, _ = _annealed_run(tmp_path / "resume", max_steps=40, ckpt_path=str(mid))
    assert min(resumed.taus) == 16  # continued at the checkpoint's step, not at 0
    for step, tau in resumed.taus.items():
        assert tau == pytest.approx(full.taus[step], rel=1e-6)
    assert full.taus[0] == pytest.approx(2.0) and full.taus[39] < full.taus[16] < 2.0


@pytest.mark.parametrize("swap_backbone", [True, False], ids=["everywhere", "head-standardized"])
def test_compile_and_channels_last_options_match_eager(tmp_path: Path, swap_backbone: bool) -> None:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    kwargs = dict(num_outputs=3, hidden_features=6, example_input_shape=[3, 8, 8],
                  swap_backbone=swap_backbone)
    eager = FlexActClassifier(backbone=backbone, **kwargs)  # type: ignore[arg-type]
    fast = FlexActClassifier(backbone=nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(),
                                                    nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                             compile=True, compile_backend="aot_eager", channels_last=True,
                             **kwargs)  # type: ignore[arg-type]
    fast.load_state_dict(eager.state_dict())
    assert fast.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(5, 3, 8, 8)
    for model in (eager, fast):
        model.train()
    torch.manual_seed(3)
    out_eager = eager(x)
    torch.manual_seed(3)
    out_fast = fast(x)
    torch.testing.assert_close(out_fast, out_eager, rtol=1e-5, atol=1e-6)
    out_fast.sum().backward()
    out_eager.sum().backward()
    assert fast.head.flexact.selection_gradient == eager.head.flexact.selection_gradient == (
        "raw" if swap_backbone else "standardized")
    torch.testing.assert_close(fast.head.flexact.logits.grad, eager.head.flexact.logits.grad,
                               rtol=1e-4, atol=1e-6)
    assert fast._compiled_forward is not None
    assert set(fast.state_dict()) == set(eager.state_dict())  # no _orig_mod. prefixes


def test_regularize_backbone_false_keeps_the_kl_on_the_head() -> None:
    backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    model = FlexActRegressor(backbone=backbone, in_features=8, hidden_features=4,
                             swap_backbone=True, regularize_backbone=False, alpha=0.3)
    layers = dict(flexact_layers(model.model))
    assert set(layers) == {"backbone.1", "backbone.3", "head.flexact"}
    model.train()
    model(torch.randn(16, 4))
    assert layers["backbone.1"]._targets is None and layers["head.flexact"]._targets is not None
    everywhere = FlexActRegressor(backbone=nn.Sequential(nn.Linear(4, 8), nn.ReLU()),
                                  in_features=8, swap_backbone=True, alpha=0.3)
    assert all(layer.regularize for _, layer in flexact_layers(everywhere))
    off = FlexActRegressor(backbone=nn.Sequential(nn.Linear(4, 8), nn.ReLU()), in_features=8,
                           swap_backbone=True)  # α = 0, the default: no targets computed at all
    assert not any(layer.regularize for _, layer in flexact_layers(off))


class _HostSyncSpy(L.Callback):
    """Records every device→host read (``.item()``, ``bool()``, ``float()`` of a tensor) that
    flexact code makes between the start and the end of each training batch: forward, loss,
    backward and optimizer step."""

    def __init__(self, probe: bool = False) -> None:
        self.calls: list[str] = []
        self.probe = probe
        self._mode: object | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             *args: object) -> None:
        import traceback

        from torch.utils._python_dispatch import TorchDispatchMode

        package = str(Path(__file__).resolve().parents[1] / "flexact")
        calls = self.calls

        class Spy(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                if func is torch.ops.aten._local_scalar_dense.default:
                    frames = [f for f in traceback.extract_stack()
                              if f.filename.startswith(package)]
                    # The optimizer's own reads (Adam's step count) run inside flexact's
                    # optimizer_step, which only sets the logits' rate around them.
                    if frames and frames[-1].name != "optimizer_step":
                        calls.append("".join(traceback.format_list(frames)))
                return func(*args, **(kwargs or {}))

        self._mode = Spy()
        self._mode.__enter__()  # type: ignore[attr-defined]
        if self.probe:  # control: a read the spy must catch (the tau property syncs)
            _ = next(layer for _, layer in flexact_layers(pl_module)).tau

    def on_train_batch_end(self, *args: object) -> None:
        self._mode.__exit__(None, None, None)  # type: ignore[attr-defined]


@pytest.mark.parametrize("probe", [False, True], ids=["training", "control"])
def test_training_step_never_reads_back_from_the_device(probe: bool) -> None:
    """Issue 8: no ``.item()`` / host synchronisation in the training step (Gumbel noise,
    regularizer, annealing, the fused batch-norm path), so a GPU never waits on the host."""
    from flexact.backbones import cifar_resnet18

    torch.manual_seed(0)
    model = FlexActClassifier(backbone=cifar_resnet18(activation="flexact"), in_features=512,
                              num_outputs=3, hidden_features=8)
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,)))
    spy = _HostSyncSpy(probe)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[spy, TemperatureAnnealing()])
    trainer.fit(model, DataLoader(data, batch_size=4))
    assert trainer.global_step == 4
    if probe:
        assert len(spy.calls) == 4 and "layer.py" in spy.calls[0]
    else:
        assert spy.calls == [], spy.calls[0]
