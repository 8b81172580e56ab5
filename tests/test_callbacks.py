from __future__ import annotations

import csv
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from flexact import ConfigError, FlexAct
from flexact.callbacks import (
    RunCheckpoint,
    SelectionCommit,
    SelectionLogger,
    SelectionMetrics,
    TemperatureAnnealing,
    temperature_at,
)
from flexact.callbacks import checkpoint as checkpoint_module
from flexact.callbacks import temperature as temperature_module
from flexact.datamodules import SyntheticDataModule
from flexact.modules import FlexActRegressor


@pytest.mark.parametrize("schedule", ["exponential", "linear", "cosine", "constant"])
def test_schedule_endpoints_and_monotonicity(schedule: str) -> None:
    values = [temperature_at(i / 10, 2.0, 0.1, schedule) for i in range(11)]  # type: ignore[arg-type]
    assert values[0] == pytest.approx(2.0)
    assert values[-1] == pytest.approx(2.0 if schedule == "constant" else 0.1)
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_schedule_shapes() -> None:
    assert temperature_at(0.5, 1.0, 0.01, "exponential") == pytest.approx(0.1)
    assert temperature_at(0.5, 1.0, 0.0 + 0.2, "linear") == pytest.approx(0.6)
    assert temperature_at(0.25, 1.0, 0.2, "cosine") == pytest.approx(
        0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert temperature_at(-1.0, 1.0, 0.1, "linear") == 1.0  # clamped
    assert temperature_at(3.0, 1.0, 0.1, "linear") == pytest.approx(0.1)


def test_bad_annealing_arguments() -> None:
    with pytest.raises(ConfigError, match="start must be a finite number > 0"):
        TemperatureAnnealing(start=0.0)
    with pytest.raises(ConfigError, match="end must be a finite number > 0"):
        TemperatureAnnealing(end=float("nan"))
    with pytest.raises(ConfigError, match="schedule"):
        TemperatureAnnealing(schedule="stepwise")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="interval"):
        TemperatureAnnealing(interval="batch")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="warmup < total"):
        TemperatureAnnealing(warmup=10, total=5)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: SelectionLogger(every_n_steps=0), "every_n_steps must be a positive int"),
    (lambda: SelectionLogger(every_n_steps=2.5), "every_n_steps must be a positive int"),
    (lambda: SelectionLogger(every_n_steps=True), "every_n_steps must be a positive int"),
    (lambda: SelectionLogger(log_entropy="yes"), "log_entropy must be true or false"),
    (lambda: SelectionLogger(plots=1), "plots must be true or false"),
    (lambda: SelectionLogger(heatmap=None), "heatmap must be true or false"),
    (lambda: SelectionLogger(filename=""), "filename must be a non-empty file name"),
    (lambda: SelectionLogger(history_filename=None), "history_filename must be a non-empty"),
    (lambda: SelectionLogger(filename="s.csv", history_filename="s.csv"), "must differ"),
    (lambda: SelectionMetrics(every_n_steps=-3), "SelectionMetrics every_n_steps"),
    (lambda: SelectionCommit(at=1.5), "fraction"),
    (lambda: SelectionCommit(at=True), "fraction"),
    (lambda: SelectionCommit(interval="batch"), "interval must be 'step' or 'epoch'"),
    (lambda: SelectionCommit(total=0), "total must be a positive int"),
])
def test_bad_selection_arguments_raise_config_error(make: Callable[[], object],
                                                    match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()


def _fit(tmp_path: Path, callbacks: list[L.Callback], **trainer_kwargs: object) -> L.Trainer:
    L.seed_everything(0)
    dm = SyntheticDataModule(n_train=256, n_val=64, batch_size=32)
    model = FlexActRegressor(in_features=4, hidden_features=3)
    options: dict[str, object] = dict(
        default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, max_epochs=2,
        logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1,
    )
    options.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=callbacks, **options)
    trainer.fit(model, dm)
    return trainer


def _csv_rows(trainer: L.Trainer) -> list[dict[str, str]]:
    assert trainer.log_dir is not None
    with open(Path(trainer.log_dir) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_annealing_applies_to_layers_and_logs_tau(tmp_path: Path) -> None:
    annealing = TemperatureAnnealing(start=1.0, end=0.1, warmup=4)
    trainer = _fit(tmp_path, [annealing])
    rows = [r for r in _csv_rows(trainer) if r.get("tau")]
    taus = [float(r["tau"]) for r in rows]
    steps = [int(r["step"]) for r in rows]
    assert taus[0] == pytest.approx(1.0) and len(taus) > 10
    assert all(t == pytest.approx(1.0) for s, t in zip(steps, taus, strict=True) if s < 4)
    assert all(a >= b for a, b in itertools.pairwise(taus))
    layer = trainer.lightning_module.head.flexact
    total = trainer.estimated_stepping_batches
    expected = temperature_at((total - 1 - 4) / (total - 4), 1.0, 0.1, "exponential")
    assert layer.tau == pytest.approx(expected, rel=1e-5)
    assert annealing.state_dict()["current_tau"] == pytest.approx(expected, rel=1e-5)


def test_annealing_per_epoch(tmp_path: Path) -> None:
    annealing = TemperatureAnnealing(start=1.0, end=0.25, schedule="linear", interval="epoch")
    trainer = _fit(tmp_path, [annealing], max_epochs=3)
    assert trainer.lightning_module.head.flexact.tau == pytest.approx(1.0 - 0.75 * 2 / 3)


def test_selection_logger_logs_every_candidate_and_writes_json(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = SelectionLogger(every_n_steps=2)
    with caplog.at_level("INFO"):
        trainer = _fit(tmp_path, [logger])
    rows = _csv_rows(trainer)
    columns = set(rows[0])
    for cand in ["relu", "sigmoid", "tanh", "leaky_relu", "identity"]:
        assert f"selection/head.flexact/{cand}" in columns
    assert "selection/head.flexact/entropy" in columns and "selection/head.flexact/pick" in columns
    logged = [r for r in rows if r.get("selection/head.flexact/relu")]
    assert len(logged) >= 8  # every 2 of 16 steps, plus epoch ends
    probs = [float(logged[-1][f"selection/head.flexact/{c}"])
             for c in ["relu", "sigmoid", "tanh", "leaky_relu", "identity"]]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    path = Path(trainer.log_dir or "") / "selection.json"
    summary = json.loads(path.read_text())
    layer = trainer.lightning_module.head.flexact
    assert summary["head.flexact"]["pick"] == layer.selected()[0]
    assert summary["head.flexact"]["probabilities"] == pytest.approx(
        layer.probabilities().tolist(), abs=1e-5)
    assert "FlexAct selection" in caplog.text and layer.selected()[0] in caplog.text


def test_selection_logger_channel_layers_and_no_logger(tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = SyntheticDataModule(n_train=64, n_val=32, batch_size=32)
    model = FlexActRegressor(in_features=4, hidden_features=6, flexact={"granularity": "channel"})
    logger = SelectionLogger(every_n_steps=1)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, max_epochs=1,
                        callbacks=[logger], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, dm)
    entry = logger.summary["head.flexact"]
    assert sum(entry["pick_counts"].values()) == 6
    assert (tmp_path / "selection.json").exists()
    assert torch.isfinite(torch.tensor(entry["probabilities"])).all()


def test_tau_is_logged_where_the_logger_writes_and_the_model_walked_once_per_fit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    walks: list[int] = []
    walk = temperature_module.flexact_layers

    def counted(model: nn.Module) -> Iterator[tuple[str, FlexAct]]:
        walks.append(1)
        return walk(model)

    monkeypatch.setattr(temperature_module, "flexact_layers", counted)
    calls: list[int] = []
    log = FlexActRegressor.log

    def spy(module: FlexActRegressor, name: str, *args: Any, **kwargs: Any) -> None:
        if name == "tau":
            calls.append(module.global_step)
        log(module, name, *args, **kwargs)

    monkeypatch.setattr(FlexActRegressor, "log", spy)
    trainer = _fit(tmp_path, [TemperatureAnnealing(start=1.0, end=0.1)], log_every_n_steps=3,
                   max_epochs=3)  # 8 steps an epoch
    rows = _csv_rows(trainer)
    tau_steps = [int(r["step"]) for r in rows if r.get("tau")]
    assert tau_steps == [int(r["step"]) for r in rows if r.get("train_loss_step")]
    assert tau_steps == [s for s in range(24) if (s + 1) % 3 == 0]
    assert calls == sorted({*tau_steps, 0, 8, 16})  # and each epoch's first step, no other
    assert "tau" in trainer.callback_metrics
    assert len(walks) == 2  # at setup and at train start, not per step


def test_selection_logger_reads_tau_once_per_record(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[float] = []
    tau = FlexAct.tau

    def counted(layer: FlexAct) -> float:
        value = tau.fget(layer)  # type: ignore[misc]
        reads.append(value)
        return value

    monkeypatch.setattr(FlexAct, "tau", property(counted, tau.fset))
    L.seed_everything(0)
    backbone = nn.Sequential(nn.Linear(4, 6), FlexAct())  # two FlexAct layers with the head
    model = FlexActRegressor(backbone=backbone, in_features=6, hidden_features=3)
    logger = SelectionLogger(every_n_steps=1)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path), max_epochs=2,
                        callbacks=[logger], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, SyntheticDataModule(n_train=128, n_val=32, batch_size=32))
    assert len(logger.summary) == 2
    steps = [row["step"] for row in logger.history]
    assert sorted(set(steps)) == list(range(9))  # the start and 2 × 4 steps
    assert len(reads) == 9  # once per record: not per layer, not again at epoch or fit end


def test_selection_commit_fixes_the_pick_after_the_fraction(tmp_path: Path) -> None:
    class Spy(L.Callback):
        def __init__(self) -> None:
            self.committed: list[bool] = []

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                               outputs: object, batch: object, batch_idx: int) -> None:
            self.committed.append(pl_module.head.flexact.committed)

    spy = Spy()
    commit = SelectionCommit(at=0.5)
    trainer = _fit(tmp_path, [commit, spy])  # 2 epochs × 8 steps
    assert spy.committed == [False] * 8 + [True] * 8
    layer = trainer.lightning_module.head.flexact
    assert layer.committed and layer.kl_divergence().item() == 0.0
    layer.train()
    x = torch.randn(5, 4)
    h = trainer.lightning_module.head.linear(x)
    picked = layer.candidates[layer.candidate_names.index(layer.selected()[0])]
    assert torch.equal(layer(h), picked(h))  # training forward = exactly the pick
    assert commit.state_dict()["committed"] is True


def test_selection_commit_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    commit = SelectionCommit(at=0.5)
    trainer = _fit(tmp_path, [commit])  # 2 epochs × 8 steps: commits at step 8
    assert commit.committed and commit.committed_at == 8
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    saved = torch.load(tmp_path / "end.ckpt", weights_only=True)["callbacks"]
    fresh = SelectionCommit(at=0.5)
    assert fresh.state_key == commit.state_key != SelectionCommit(at=0.25).state_key
    assert not fresh.committed and fresh.committed_at is None
    fresh.load_state_dict(saved[fresh.state_key])
    assert (fresh.committed, fresh.committed_at) == (True, 8)
    assert fresh.state_dict() == commit.state_dict()
    old = SelectionCommit(at=0.5)
    old.load_state_dict({"committed": True, "at": 0.5})  # a checkpoint from before committed_at
    assert (old.committed, old.committed_at) == (True, None)


def test_selection_history_csv_is_appended_not_rewritten(tmp_path: Path) -> None:
    class Spy(L.Callback):
        """After the logger's epoch end: the CSV's bytes and inode."""

        def __init__(self) -> None:
            self.seen: list[tuple[bytes, int]] = []

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            path = Path(trainer.log_dir or "") / "selection_history.csv"
            self.seen.append((path.read_bytes(), os.stat(path).st_ino))

    logger, spy = SelectionLogger(every_n_steps=3), Spy()
    trainer = _fit(tmp_path, [logger, spy], max_epochs=3)
    path = Path(trainer.log_dir or "") / "selection_history.csv"
    assert len(spy.seen) == 3
    for (before, inode), (after, later_inode) in itertools.pairwise(spy.seen):
        assert len(after) > len(before) and after.startswith(before)  # earlier bytes unchanged
        assert later_inode == inode  # the same file, appended to (not replaced)
    assert (path.read_bytes(), os.stat(path).st_ino) == spy.seen[-1]  # nothing new at fit end
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{k: str(v) for k, v in row.items()} for row in logger.history]


# ---------------------------------------------------------------------------- RunCheckpoint
class _Recorded(RunCheckpoint):
    """RunCheckpoint that records ``(step, file name)`` of every checkpoint it writes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writes: list[tuple[int, str]] = []

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.writes.append((trainer.global_step, Path(filepath).name))


class _Clock:
    """A fake ``time`` module whose clock advances 25 s after every training batch."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class _Tick(L.Callback):
    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.clock.now += 25.0


def test_run_checkpoint_refreshes_last_every_n_minutes_and_keeps_the_latest_epoch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(checkpoint_module, "time", clock)
    saver = _Recorded(every_n_minutes=1)
    trainer = _fit(tmp_path, [_Tick(clock), saver], enable_checkpointing=True)  # 2 × 8 steps
    # 25 s per step: last.ckpt after 3 steps (75 s ≥ 60 s), 3 more, then the epoch end (no
    # mid-epoch save on an epoch's last batch); the latest epoch's file is kept.
    assert saver.writes == [
        (3, "last.ckpt"), (6, "last.ckpt"), (8, "epoch=0-step=8.ckpt"), (8, "last.ckpt"),
        (11, "last.ckpt"), (14, "last.ckpt"), (16, "epoch=1-step=16.ckpt"), (16, "last.ckpt")]
    folder = Path(trainer.log_dir or "") / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=1-step=16.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 16
    assert trainer.checkpoint_callback is saver and saver.best_model_path.endswith("16.ckpt")


def test_run_checkpoint_beside_a_users_model_checkpoint(tmp_path: Path) -> None:
    saver = _Recorded(every_n_minutes=None, every_n_train_steps=5)
    mine = ModelCheckpoint(dirpath=tmp_path / "mine", filename="{epoch}", save_top_k=-1)
    trainer = _fit(tmp_path, [mine, saver], enable_checkpointing=True)
    # The user's callback writes the epoch files; this one only last.ckpt.
    assert saver.writes == [(5, "last.ckpt"), (8, "last.ckpt"), (10, "last.ckpt"),
                            (15, "last.ckpt"), (16, "last.ckpt")]
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["epoch=0.ckpt",
                                                                      "epoch=1.ckpt"]
    folder = Path(trainer.log_dir or "") / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("case", ["user_save_last", "fast_dev_run"])
def test_run_checkpoint_stays_out_of_the_way(tmp_path: Path, case: str) -> None:
    saver = _Recorded(every_n_train_steps=1)
    if case == "user_save_last":  # the user's own callback writes last.ckpt
        mine = ModelCheckpoint(dirpath=tmp_path / "mine", save_last=True)
        _fit(tmp_path, [mine, saver], enable_checkpointing=True)
        assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [
            "epoch=1-step=16.ckpt", "last.ckpt"]
    else:
        _fit(tmp_path, [saver], enable_checkpointing=True, fast_dev_run=2)
    assert saver.writes == []
    assert not [p for p in tmp_path.rglob("*.ckpt") if "mine" not in p.parts]


def test_run_checkpoint_never_saves_inside_an_accumulation_window(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(checkpoint_module, "time", clock)
    saver = _Recorded(every_n_minutes=1)
    _fit(tmp_path, [_Tick(clock), saver], enable_checkpointing=True, accumulate_grad_batches=2)
    # 60 s are up after batch 2, the first of a window: the save waits for the step (batch 3).
    assert [s for s, name in saver.writes if name == "last.ckpt"] == [2, 4, 6, 8]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"every_n_minutes": 0}, "every_n_minutes must be a number > 0 or null"),
    ({"every_n_minutes": float("inf")}, "every_n_minutes must be a number > 0 or null"),
    ({"every_n_minutes": True}, "every_n_minutes must be a number > 0 or null"),
    ({"every_n_train_steps": 0}, "every_n_train_steps must be a positive int"),
    ({"every_n_train_steps": 2.5}, "every_n_train_steps must be a positive int"),
])
def test_bad_run_checkpoint_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunCheckpoint(**kwargs)


def test_run_checkpoint_state_survives_a_new_interval(tmp_path: Path) -> None:
    saver = RunCheckpoint()
    saver.best_model_path = str(tmp_path / "epoch=0-step=8.ckpt")
    changed = RunCheckpoint(every_n_minutes=2, every_n_train_steps=3)
    assert changed.state_key == saver.state_key  # found again when resumed with other settings
    changed.load_state_dict(saver.state_dict())
    assert changed.best_model_path == saver.best_model_path
