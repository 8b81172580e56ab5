"""Exact resume: a run resumed from a checkpoint ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from flexact.callbacks import FiniteGuard, RNGState
from flexact.checkpoint import AtomicCheckpointIO
from flexact.cli import FlexActCLI, build_cli

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
        "exp_avg": optimizer.state[model.head.flexact.logits]["exp_avg"].clone(),
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
    state = checkpoint["state_dict"]["head.flexact._extra_state"]
    assert state == {"candidates": ["relu", "sigmoid", "tanh", "leaky_relu", "identity"]}
