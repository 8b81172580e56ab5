"""No DDP deadlock: every shipped config on two gloo ranks, with the progress bar on.

Lightning's progress bar runs on rank 0 only and, in ``on_train_epoch_end`` and
``on_validation_end``, reads the epoch's metrics. A metric that synchronizes itself when it is
first read (a torchmetrics metric logged as it is updated, a ``sync_dist=True`` value) then
runs its collective on rank 0 alone, and a callback's collective in the same hook (FiniteGuard's
all-reduce, once) crosses it: both ranks wait forever. Each run here is bounded by a timeout
that turns a hang into a failure.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.trainer.states import TrainerFn

from flexact.callbacks import FiniteGuard

from . import test_cli
from .conftest import CONFIGS, REPO
from .test_distributed import run_bounded

TIMEOUT = 120  # seconds per 2-rank run; a run takes ~10-20 s on two CPU cores
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
       "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
       "--trainer.limit_val_batches", "1", "--trainer.enable_model_summary", "false"]
FINISHED = "`Trainer.fit` stopped: `max_epochs=2` reached."
tiny_data = test_cli.tiny_data  # the fixture: tiny CIFAR-10, MNIST and polarity sets, real formats


def _composed(config: Path) -> dict[str, Any]:
    """The config as the CLI reads it: its ``extends:`` chain merged, the file's keys winning."""
    data = yaml.safe_load(config.read_text()) or {}
    base = data.pop("extends", None)
    return _merged(_composed(config.parent / base), data) if base else data


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def _tiny_overrides(config: Path, data_dir: Path, root: Path) -> list[str]:
    """Overrides that make ``config`` tiny: small data (real formats), small backbone, tmp dirs."""
    composed = _composed(config)
    args = ["--trainer.default_root_dir", str(root)]
    logger = composed["trainer"].get("logger")
    if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
        args += ["--trainer.logger.init_args.save_dir", str(root)]
    data = composed["data"].get("init_args") or {}
    if "data_dir" in data:
        args += ["--data.data_dir", str(data_dir), "--data.download", "false",
                 "--data.batch_size", "2"]
    if "n_train" in data:
        args += ["--data.n_train", "64", "--data.n_val", "16", "--data.n_test", "16",
                 "--data.batch_size", "8"]
    if "max_length" in data:
        args += ["--data.max_length", "50"]
    backbone = (composed["model"].get("init_args") or {}).get("backbone") or {}
    if str(backbone.get("class_path", "")).endswith("TextCNN"):
        args += ["--model.backbone.init_args.embedding_dim", "16",
                 "--model.backbone.init_args.num_filters", "8"]
    return args


def _fit_ddp(config: Path, root: Path, data_dir: Path, *extra: str) -> str:
    """``flexact fit`` of ``config`` on 2 gloo ranks for 2 epochs; the output (fails on a hang)."""
    command = [sys.executable, "-m", "flexact", "fit", "--config", str(config), *DDP,
               *_tiny_overrides(config, data_dir, root), *extra]
    out = run_bounded(command, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout[-4000:]
    assert FINISHED in out.stdout, out.stdout[-4000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_runs_ddp_with_the_progress_bar(config: Path, tmp_path: Path,
                                                     tiny_data: Path) -> None:
    log = _fit_ddp(config, tmp_path, tiny_data)
    assert "Epoch 1: 100%" in log  # the default progress bar was on
    assert log.count("FlexAct selection") == 1  # rank 0 alone reports
    assert list(tmp_path.rglob("*.ckpt"))


# ---------------------------------------------------------------------------- any callback order
class RankZeroMetricsReader(L.Callback):
    """Test-only: reads the epoch's metrics on rank 0 only, where the progress bar does."""

    def _read(self, trainer: L.Trainer) -> None:
        if trainer.global_rank == 0:
            _ = trainer.callback_metrics, trainer.progress_bar_metrics

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer)


class EpochEndCollective(L.Callback):
    """Test-only: one all-reduce in each epoch-end hook, on every rank (checks its result)."""

    def _reduce(self, trainer: L.Trainer) -> None:
        if trainer.world_size > 1 and not trainer.sanity_checking:
            total = trainer.strategy.reduce(torch.ones(3), reduce_op="sum")
            assert total.tolist() == [trainer.world_size] * 3

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reduce(trainer)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reduce(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reduce(trainer)


_HERE = "tests.test_ddp_configs."
_BAR = "lightning.pytorch.callbacks.TQDMProgressBar"
_READER, _COLLECTIVE = _HERE + "RankZeroMetricsReader", _HERE + "EpochEndCollective"
# Callbacks appended to the config's, in this order (this FiniteGuard replaces the forced one).
# The other order, the progress bar after FiniteGuard, is every config's default above.
ORDERS = {
    "bar-and-reader-first": [_BAR, _READER, _COLLECTIVE, "flexact.callbacks.FiniteGuard"],
    "bar-off": [_READER, _COLLECTIVE],
}


@pytest.mark.slow
@pytest.mark.parametrize("order", ORDERS)
def test_epoch_end_collectives_do_not_cross_rank_zero_metric_reads(order: str,
                                                                   tmp_path: Path) -> None:
    """Before the fix both hung at the end of epoch 0: rank 0 synchronized the training
    metrics in the progress bar (or the reader) while rank 1 entered the next callback's
    all-reduce (FiniteGuard's or EpochEndCollective's)."""
    extra = [f"--trainer.callbacks+={name}" for name in ORDERS[order]]
    if order == "bar-off":
        extra += ["--trainer.enable_progress_bar", "false"]
    _fit_ddp(REPO / "configs" / "synthetic.yaml", tmp_path, tmp_path, *extra)


# ---------------------------------------------------------------------------- FiniteGuard's hooks
class _RecordingStrategy:
    def __init__(self) -> None:
        self.calls = 0

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        self.calls += 1
        return tensor


def test_finite_guard_runs_no_collective_at_epoch_end() -> None:
    """Its all-reduce runs at the epoch's last batch (every rank there alike), never in
    ``on_train_epoch_end``; checks with nothing new since the last one run none at all."""
    strategy = _RecordingStrategy()
    progress = SimpleNamespace(is_last_batch=False)
    trainer = SimpleNamespace(
        world_size=2, global_rank=1, global_step=0, current_epoch=0, num_training_batches=3,
        strategy=strategy, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
            batch_progress=progress)), sanity_checking=False,
        state=SimpleNamespace(fn=TrainerFn.FITTING), optimizers=[], precision="32-true",
        checkpoint_callbacks=[])
    module = torch.nn.Linear(2, 1)
    module.device = torch.device("cpu")  # type: ignore[assignment]
    guard = FiniteGuard(check_every_n_steps=10)
    guard.on_train_start(trainer, module)  # type: ignore[arg-type]
    for batch_idx in range(3):
        guard.on_train_batch_start(trainer, module, None, batch_idx)  # type: ignore[arg-type]
        guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)},  # type: ignore
                                 None, batch_idx)
        assert strategy.calls == (1 if batch_idx == 2 else 0)
    guard.on_train_epoch_end(trainer, module)  # type: ignore[arg-type]
    guard.on_validation_start(trainer, module)  # type: ignore[arg-type]
    guard.on_train_end(trainer, module)  # type: ignore[arg-type]
    assert strategy.calls == 1
    guard.on_save_checkpoint(trainer, module, {})  # type: ignore[arg-type]
    assert strategy.calls == 2  # parameters are checked before every checkpoint
