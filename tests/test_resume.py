"""Exact resume: a run resumed from a checkpoint ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from flexact.backbones import LeNet5
from flexact.callbacks import FiniteGuard, RNGState
from flexact.cli import FlexActCLI, build_cli
from flexact.cli.checkpoint import AtomicCheckpointIO
from flexact.datamodules import CIFAR10DataModule
from flexact.datamodules._images import TensorBatchLoader
from flexact.modules import FlexActClassifier
from flexact.tools.fake_data import write_cifar10

from .conftest import REPO

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _run(root: Path, ckpt_path: Path | None = None) -> FlexActCLI:
    """The synthetic config with a scheduler and checkpoints mid-epoch and after every epoch.

    160 samples / batch 32 = 5 steps per epoch, 3 epochs: step checkpoints at steps 3, 6, 9,
    12, 15 and epoch checkpoints after each epoch; SelectionCommit switches at step 11.
    """
    root.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "configs" / "synthetic.yaml").read_text())
    config["trainer"]["callbacks"] += [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "steps"), "filename": "{step}",
                       "every_n_train_steps": 3, "save_top_k": -1}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "epochs"), "filename": "{epoch}",
                       "every_n_epochs": 1, "save_top_k": -1}},
    ]
    config["model"]["init_args"]["lr_scheduler"] = {
        "class_path": "torch.optim.lr_scheduler.StepLR",
        "init_args": {"step_size": 1, "gamma": 0.6},
    }
    path = root / "resume.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    args = ["fit", "--config", str(path), "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.max_epochs", "3",
            "--data.n_train", "160", "--data.n_val", "32", "--data.n_test", "32",
            "--data.batch_size", "32", *QUIET]
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    return build_cli(args)


def _state(cli: FlexActCLI) -> dict[str, Any]:
    model = cli.model
    optimizer = cli.trainer.optimizers[0]
    return {
        "logits": model.head.flexact.logits.detach().clone(),
        "weight": model.head.linear.weight.detach().clone(),
        "tau": model.head.flexact.tau,
        "committed": model.head.flexact.committed,
        "lr": optimizer.param_groups[0]["lr"],
        # The weight's: the config clears the optimizer's state at the commit (step 11), and
        # the committed logits train no more, so they have none after it.
        "exp_avg": optimizer.state[model.head.linear.weight]["exp_avg"].clone(),
        "adam_step": int(optimizer.state[model.head.linear.weight]["step"]),
        "step": cli.trainer.global_step,
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("uninterrupted")
    cli = _run(root)
    # What makes the resume exact is on by default in every flexact run.
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, RNGState) for c in cli.trainer.callbacks)
    assert any(isinstance(c, FiniteGuard) for c in cli.trainer.callbacks)
    return _state(cli), root


def _assert_same(resumed: dict[str, Any], full: dict[str, Any], trained: bool = True) -> None:
    assert resumed["step"] == full["step"] == 15
    assert torch.equal(resumed["logits"], full["logits"])  # bit for bit
    assert torch.equal(resumed["weight"], full["weight"])
    assert torch.equal(resumed["exp_avg"], full["exp_avg"])
    assert resumed["adam_step"] == full["adam_step"] == 15 - 11  # restarted at the commit
    assert resumed["lr"] == full["lr"]
    assert resumed["committed"] == full["committed"] is True
    if trained:  # the layer keeps the τ of the last trained step (none after the final one)
        assert resumed["tau"] == full["tau"]


@pytest.mark.parametrize("checkpoint", [
    "epochs/epoch=0.ckpt",  # epoch boundary (saved after validation)
    "steps/step=3.ckpt",  # mid-epoch
    "steps/step=9.ckpt",  # mid-epoch, after a scheduler step, before the commit
    "steps/step=15.ckpt",  # the end: nothing left to train
])
def test_resumed_run_ends_exactly_like_the_uninterrupted_one(
    uninterrupted: tuple[dict[str, Any], Path], tmp_path: Path, checkpoint: str
) -> None:
    full, run = uninterrupted
    cli = _run(tmp_path, ckpt_path=run / checkpoint)
    _assert_same(_state(cli), full, trained=checkpoint != "steps/step=15.ckpt")


@pytest.mark.parametrize("drop", ["rng", "data order"])
def test_resume_without_the_saved_state_diverges(
    uninterrupted: tuple[dict[str, Any], Path], tmp_path: Path, drop: str
) -> None:
    """The equivalence above is not vacuous: without either saved state the run differs."""
    full, run = uninterrupted
    checkpoint = torch.load(run / "steps/step=3.ckpt", weights_only=True)
    stripped = copy.deepcopy(checkpoint)
    if drop == "rng":
        key = next(k for k in stripped["callbacks"] if k.startswith("RNGState"))
        del stripped["callbacks"][key]
    else:
        del stripped["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    path = tmp_path / "stripped.ckpt"
    torch.save(stripped, path)
    cli = _run(tmp_path / "run", ckpt_path=path)
    assert cli.trainer.global_step == 15
    assert not torch.equal(cli.model.head.flexact.logits.detach(), full["logits"])


def test_checkpoint_holds_the_random_states_and_the_loader_position(
    uninterrupted: tuple[dict[str, Any], Path],
) -> None:
    _, run = uninterrupted
    checkpoint = torch.load(run / "steps/step=3.ckpt", weights_only=True)  # loads safely
    (rng,) = [v["rng"] for k, v in checkpoint["callbacks"].items() if k.startswith("RNGState")]
    assert set(rng) >= {"torch", "python", "numpy"}
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches": 3}]
    state = checkpoint["state_dict"]["model.head.flexact._extra_state"]
    assert state == {"candidates": ["relu", "sigmoid", "tanh", "leaky_relu", "identity"]}


# --------------------------------------------------------------------------- on-device images
# CIFAR-format data kept "on the device" (forced on the CPU): batches drawn by indexing tensors,
# augmented by the batch. 40 training images, 8 held out, batch 8: 4 steps per epoch, 3 epochs;
# checkpoints every 3 steps, so step 3 lies inside epoch 0 and step 6 inside epoch 1.


def _image_run(data: Path, root: Path, on_device: bool,
               ckpt_path: Path | None = None) -> L.LightningModule:
    L.seed_everything(0)
    dm = CIFAR10DataModule(data_dir=str(data), val_split=0.2, batch_size=8, augment=True,
                           on_device=on_device)
    backbone = LeNet5(in_channels=3, image_size=32, channels=(4, 8), hidden_features=None)
    model = FlexActClassifier(backbone=backbone, num_outputs=10, hidden_features=16,
                              optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    steps = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=3,
                            save_top_k=-1)
    # A plain Trainer gets RNGState only when asked (the flexact CLI adds it to every run).
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False,
                        callbacks=[steps, RNGState()], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert trainer.global_step == 12
    loader = trainer.train_dataloader
    assert isinstance(loader, TensorBatchLoader) == on_device
    return model


@pytest.fixture(scope="module")
def image_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, n_train_per_class=4, n_test_per_class=1)
    return root


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()  # small convolutions: one thread is as fast, and steady
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted_images(image_data: Path, one_thread: None,
                         tmp_path_factory: pytest.TempPathFactory
                         ) -> dict[bool, tuple[dict[str, Any], Path]]:
    runs = {}
    for on_device in (True, False):
        root = tmp_path_factory.mktemp(f"images_on_device_{on_device}")
        runs[on_device] = (_image_run(image_data, root, on_device).state_dict(), root)
    return runs


def _equal_states(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bit-for-bit equal tensors (and equal extra states) under the same names."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("on_device", [True, False], ids=["on_device", "dataloader"])
@pytest.mark.parametrize("checkpoint", ["step=3.ckpt", "step=6.ckpt"])
def test_resumed_image_run_ends_exactly_like_the_uninterrupted_one(
    uninterrupted_images: dict[bool, tuple[dict[str, Any], Path]], image_data: Path,
    tmp_path: Path, on_device: bool, checkpoint: str,
) -> None:
    full, run = uninterrupted_images[on_device]
    saved = torch.load(run / checkpoint, weights_only=True)
    step = int(checkpoint[5:-5])
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": step // 4, "batches": step % 4}]  # mid-epoch: the position is saved
    resumed = _image_run(image_data, tmp_path, on_device, ckpt_path=run / checkpoint)
    assert _equal_states(resumed.state_dict(), full)  # bit for bit


def test_on_device_and_dataloader_image_runs_train_on_the_same_batches(
    uninterrupted_images: dict[bool, tuple[dict[str, Any], Path]],
) -> None:
    """Same order and same augmentation whether the data set lives on the device or not."""
    assert _equal_states(uninterrupted_images[True][0], uninterrupted_images[False][0])


def test_resumed_image_run_without_the_loader_position_diverges(
    uninterrupted_images: dict[bool, tuple[dict[str, Any], Path]], image_data: Path,
    tmp_path: Path,
) -> None:
    """The equality above is not vacuous: restarting the epoch's data changes the result."""
    full, run = uninterrupted_images[True]
    checkpoint = torch.load(run / "step=6.ckpt", weights_only=True)
    del checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    path = tmp_path / "stripped.ckpt"
    torch.save(checkpoint, path)
    resumed = _image_run(image_data, tmp_path / "run", True, ckpt_path=path)
    assert not _equal_states(resumed.state_dict(), full)
