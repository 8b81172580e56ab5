"""``kill -9`` in the middle of an epoch, then resume: the finished run equals an uninterrupted one.

Every ``flexact fit`` keeps ``last.ckpt`` up to date (``RunCheckpoint``) and a resumed run
continues in its checkpoint's run folder, so the run killed here loses at most the configured
interval and ends with the same selection history, CSV, JSON, plots, TensorBoard scalars and
weights as the run that was never interrupted.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flexact.callbacks import RunCheckpoint
from flexact.cli import FlexActCLI, build_cli
from flexact.cli.runs import run_folder_of

from .conftest import REPO

STEPS_PER_EPOCH = 8  # 256 samples / batch 32
INTERVAL = 3  # --checkpoint.every_n_train_steps
KILL_AFTER = 13  # steps done when the kill is sent: epoch 1, batch 5 (a checkpoint at step 12)
TIMEOUT = 120.0  # bound on every wait


class Throttle(L.Callback):
    """Test-only: write the finished step to ``path`` after every batch, then sleep."""

    def __init__(self, path: str, seconds: float = 0.1) -> None:
        self.path = path
        self.seconds = seconds

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        Path(self.path).write_text(str(trainer.global_step))
        time.sleep(self.seconds)


def _command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flexact", "fit", "--config", "configs/synthetic.yaml",
            "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.max_epochs", "3", "--trainer.log_every_n_steps", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.n_train", "256", "--data.n_val", "64", "--data.batch_size", "32",
            "--trainer.callbacks.every_n_steps", "2",  # SelectionLogger (the last)
            "--checkpoint.every_n_train_steps", str(INTERVAL), *extra]


def _throttled(root: Path) -> list[str]:
    return _command(root, "--trainer.callbacks+=tests.test_kill_resume.Throttle",
                    "--trainer.callbacks.path", str(root / "progress"))


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as handle:
        return subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONHASHSEED": "0"})


def _wait(process: subprocess.Popen[bytes], log: Path) -> None:
    try:
        code = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
        raise
    assert code == 0, log.read_text()[-4000:]


def _poll(condition: Any, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _step(path: Path) -> int:
    try:
        return int(path.read_text() or -1)
    except (OSError, ValueError):
        return -1


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _rows(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "selection_history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_kill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    full_root, killed_root = tmp_path / "full", tmp_path / "killed"
    for root in (full_root, killed_root):
        root.mkdir()
    full = _start(_command(full_root), full_root / "log")  # runs alongside the killed one
    killed = _start(_throttled(killed_root), killed_root / "log")
    try:
        progress = killed_root / "progress"
        run_dir = killed_root / "synthetic" / "version_0"
        last = run_dir / "checkpoints" / "last.ckpt"
        _poll(lambda: _step(progress) >= KILL_AFTER and last.is_file(), killed,
              f"step {KILL_AFTER} and a step checkpoint")
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    done = _step(progress)
    saved = torch.load(last, weights_only=True)["global_step"]
    # A step checkpoint in the middle of epoch 1; at most the interval is lost.
    assert STEPS_PER_EPOCH < saved < 2 * STEPS_PER_EPOCH and saved % INTERVAL == 0
    assert 0 <= done - saved <= INTERVAL, (done, saved)

    resumed = _start([*_throttled(killed_root), "--ckpt_path", str(last)],
                     killed_root / "resumed.log")
    _wait(resumed, killed_root / "resumed.log")
    _wait(full, full_root / "log")
    assert "Resuming in the run folder" in (killed_root / "resumed.log").read_text()

    # One run folder, with the uninterrupted run's files.
    (full_dir,) = (full_root / "synthetic").iterdir()
    assert [p.name for p in (killed_root / "synthetic").iterdir()] == ["version_0"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()
                  if not p.name.startswith(".")) == ["epoch=2-step=24.ckpt", "last.ckpt"]
    assert _rows(run_dir) == _rows(full_dir)
    assert int(_rows(run_dir)[0]["step"]) == 0 and int(_rows(run_dir)[-1]["step"]) == 24
    assert (json.loads((run_dir / "selection.json").read_text())
            == json.loads((full_dir / "selection.json").read_text()))
    for png in full_dir.glob("selection_*.png"):
        assert np.array_equal(plt.imread(run_dir / png.name), plt.imread(png))
    # TensorBoard: the interrupted run's events after the checkpoint are purged and logged
    # again, so every series is the uninterrupted one, step for step ...
    resumed_scalars, full_scalars = _scalars(run_dir), _scalars(full_dir)
    assert {"selection/head.flexact/relu", "tau", "train_loss_step", "val_loss",
            "hp_metric"} <= set(full_scalars)
    # ... except the training means of the interrupted epoch (logged at its last step):
    # Lightning does not checkpoint the running means of `on_epoch` metrics, so they cover
    # the batches after the resume only.
    interrupted = 2 * STEPS_PER_EPOCH - 1
    for tag in ("train_loss_epoch", "train_mae", "train_mse"):
        resumed_means, full_means = resumed_scalars.pop(tag), full_scalars.pop(tag)
        assert [s for s, _ in resumed_means] == [s for s, _ in full_means]
        assert ([e for e in resumed_means if e[0] != interrupted]
                == [e for e in full_means if e[0] != interrupted])
    assert resumed_scalars == full_scalars
    # And the weights, bit for bit.
    ends = [torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
            for d in (run_dir, full_dir)]
    assert ends[0].keys() == ends[1].keys()
    for key, value in ends[0].items():
        other = ends[1][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


# ------------------------------------------------------------------ in-process checks (fast)
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _tiny(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / "synthetic.yaml"),
            "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), "--data.n_train", "128",
            "--data.n_val", "32", "--data.batch_size", "32", "--trainer.max_epochs", "1",
            *QUIET, *extra]


def _run_checkpoints(cli: FlexActCLI) -> list[RunCheckpoint]:
    return [c for c in cli.trainer.callbacks if isinstance(c, RunCheckpoint)]


def test_every_fit_saves_last_and_resume_last_continues_in_the_same_folder(
        tmp_path: Path) -> None:
    first = build_cli(_tiny(tmp_path))
    (saver,) = _run_checkpoints(first)
    assert saver.every_n_minutes == 5.0 and saver.every_n_train_steps is None  # the defaults
    run_dir = Path(first.trainer.log_dir or "")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "epoch=0-step=4.ckpt", "last.ckpt"]
    resumed = build_cli(_tiny(tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    assert resumed.trainer.global_step == 8
    assert Path(resumed.trainer.log_dir or "") == run_dir
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == ["version_0"]
    steps = sorted({int(r["step"]) for r in _rows(run_dir)})
    assert steps[0] == 0 and steps[-1] == 8  # the CSV covers the whole run
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2  # one TensorBoard run
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)[
        "global_step"] == 8


@pytest.mark.parametrize("case", ["pinned_version", "outside_the_root"])
def test_resume_keeps_a_new_folder_when_asked_or_elsewhere(tmp_path: Path, case: str) -> None:
    first = build_cli(_tiny(tmp_path / "a"))
    last = Path(first.trainer.log_dir or "") / "checkpoints" / "last.ckpt"
    if case == "pinned_version":
        root, extra = tmp_path / "a", ["--trainer.logger.init_args.version", "finetune"]
        expected = ["finetune", "version_0"]
    else:
        root, extra, expected = tmp_path / "b", [], ["version_0"]
    resumed = build_cli(_tiny(root, "--trainer.max_epochs", "2", "--ckpt_path", str(last),
                              *extra))
    assert resumed.trainer.global_step == 8
    assert sorted(p.name for p in (root / "synthetic").iterdir()) == expected
    assert Path(resumed.trainer.log_dir or "") != last.parents[1]


def test_run_folder_of(tmp_path: Path) -> None:
    root = tmp_path / "runs" / "synthetic"
    assert run_folder_of(root / "version_3" / "checkpoints" / "last.ckpt", root) == "version_3"
    assert run_folder_of(root / "version_3" / "x.ckpt", root) == "version_3"
    assert run_folder_of(root / "x.ckpt", root) is None
    assert run_folder_of(tmp_path / "elsewhere" / "last.ckpt", root) is None


def test_checkpoint_settings_on_the_command_line(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    off = build_cli(_tiny(tmp_path, "--trainer.enable_checkpointing", "false"))
    assert not _run_checkpoints(off) and not list(tmp_path.rglob("*.ckpt"))
    steps = build_cli(_tiny(tmp_path, "--checkpoint.every_n_train_steps", "2",
                            "--checkpoint.every_n_minutes", "null"))
    (saver,) = _run_checkpoints(steps)
    assert (saver.every_n_train_steps, saver.every_n_minutes) == (2, None)
    own = build_cli(_tiny(tmp_path, "--trainer.callbacks+=RunCheckpoint",
                          "--trainer.callbacks.every_n_minutes", "1"))
    assert [c.every_n_minutes for c in _run_checkpoints(own)] == [1.0]  # replaces the default
    with pytest.raises(SystemExit) as exit_info:
        build_cli(_tiny(tmp_path, "--checkpoint.every_n_minutes", "0"))
    assert exit_info.value.code == 2
    assert "checkpoint.every_n_minutes" in capsys.readouterr().err  # one line naming the key
