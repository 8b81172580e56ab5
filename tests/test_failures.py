"""Failure behaviour: what the user sees for each case in docs/distributed.md's table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from flexact import ConfigError, FlexAct
from flexact.callbacks import FiniteGuard, NonFiniteLossError
from flexact.cli import build_cli, main
from flexact.cli.checkpoint import AtomicCheckpointIO, use_atomic_checkpoints
from flexact.datamodules import SyntheticDataModule
from flexact.modules import FlexActRegressor

from .conftest import REPO
from .test_distributed import clean_env, run_bounded

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SYNTHETIC = str(REPO / "configs" / "synthetic.yaml")
PLACE = re.compile(r"at step (\d+) \(epoch (\d+), batch (\d+)(?:, rank (\d+))?\)")


def _common(root: Path) -> list[str]:
    return ["--config", SYNTHETIC, "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), "--data.n_train", "160",
            "--data.n_val", "32", "--data.n_test", "32", "--data.batch_size", "32", *QUIET]


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("flexact: error:")]
    return int(exit_info.value.code or 0), line


class PoisonBatch(L.Callback):
    """Test-only: put a NaN into the inputs of the batch at ``step`` on rank ``rank``."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            batch[0][0, 0] = float("nan")


# ---------------------------------------------------------------------------- NaN / inf loss
def test_high_learning_rate_names_step_and_cause_and_keeps_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Plain SGD at lr 10 on linear regression: the loss overflows in the third epoch.
    code, line = _cli_error(["fit", *_common(tmp_path), "--trainer.max_epochs", "4",
                             "--model.flexact.candidates", "[identity]",
                             "--model.optimizer", "torch.optim.SGD",
                             "--model.optimizer.lr", "10"], capsys)
    assert code == 1
    assert "training stopped: the training loss is not finite" in line
    assert "learning rate too high (lr = 10)" in line
    assert "bad inputs" not in line and "τ too small" not in line
    step, epoch, _, _ = PLACE.search(line).groups()  # type: ignore[union-attr]
    assert int(epoch) >= 1
    (named,) = re.findall(r"is intact: (\S+\.ckpt)", line)
    checkpoints = list(tmp_path.rglob("*.ckpt"))  # the epoch file and last.ckpt
    assert named in [str(c) for c in checkpoints]
    for checkpoint in checkpoints:  # nothing written after the failure
        assert torch.load(checkpoint, weights_only=True)["global_step"] <= int(step)
    state = torch.load(named, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values()
               if isinstance(v, torch.Tensor))


def test_tiny_tau_is_named_as_the_first_cause(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # 1/τ overflows float32: the Gumbel-Softmax scores are infinite at the first step.
    code, line = _cli_error(["fit", *_common(tmp_path), "--trainer.callbacks", "null",
                             "--temperature.end", "null", "--model.flexact.tau", "1e-40"],
                            capsys)
    assert code == 1
    assert "at step 0 (epoch 0, batch 0)" in line
    assert line.index("τ too small (τ = 1e-40") < line.index("learning rate too high")
    assert "No checkpoint was written before the failure" in line


def _poisoned_fit(root: Path, poison_step: int, every: int) -> tuple[NonFiniteLossError, Path]:
    L.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", filename="{step}",
                                  every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(default_root_dir=root, max_epochs=3, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        plugins=[AtomicCheckpointIO()],
                        callbacks=[FiniteGuard(check_every_n_steps=every), checkpoints,
                                   PoisonBatch(poison_step)])
    model = FlexActRegressor(in_features=4)
    data = SyntheticDataModule(n_train=160, n_val=32, batch_size=32)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(model, data)
    return info.value, root / "ckpt"


@pytest.mark.parametrize("every", [1, 100])
def test_bad_inputs_are_blamed_and_no_checkpoint_is_written_after_them(
    tmp_path: Path, every: int
) -> None:
    """Checked every step or rarely: the same step is named, and the save after it is refused."""
    error, folder = _poisoned_fit(tmp_path, poison_step=7, every=every)
    message = str(error)
    assert "at step 7 (epoch 1, batch 2)" in message
    assert "bad inputs: the batch at step 7 (epoch 1, batch 2) contains NaN or inf" in message
    saved = sorted(int(p.stem.split("=")[1]) for p in folder.glob("*.ckpt"))
    assert saved == list(range(1, 8))  # step=8 (after the poisoned update) was never written
    assert str(folder / "step=7.ckpt") in message
    assert not list(folder.glob(".*"))  # no temporary file left behind
    restored = FlexActRegressor.load_from_checkpoint(folder / "step=7.ckpt")
    assert all(torch.isfinite(p).all() for p in restored.parameters())


def test_parameters_are_checked_before_a_checkpoint() -> None:
    model = FlexActRegressor(in_features=4)
    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    with torch.no_grad():
        model.head.linear.weight[0, 0] = float("inf")
    guard = FiniteGuard()
    with pytest.raises(NonFiniteLossError, match=r"parameters became NaN or infinite.*"
                                                 r"head\.linear\.weight"):
        guard.on_save_checkpoint(trainer, model, {})
    with pytest.raises(ConfigError, match="check_every_n_steps"):
        FiniteGuard(check_every_n_steps=0)


@pytest.mark.slow
def test_nan_on_one_ddp_rank_stops_every_rank(tmp_path: Path) -> None:
    out = run_bounded([sys.executable, "-m", "flexact", "fit", *_common(tmp_path),
                       "--data.n_train", "128", "--data.batch_size", "16",
                       "--trainer.max_epochs", "3", "--trainer.accelerator", "cpu",
                       "--trainer.devices", "2", "--trainer.strategy", "ddp",
                       "--trainer.callbacks+=tests.test_failures.PoisonBatch",
                       "--trainer.callbacks.step", "5", "--trainer.callbacks.rank", "1",
                       "--model.alpha", "0.3"],  # the NaN travels through synchronized ḡ
                      timeout=120)
    assert out.returncode == 1, out.stdout[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("flexact: error:")]
    # Rank 1's NaN reaches rank 0's loss in the same step (through the synchronized
    # statistics); the cause names the rank whose batch held it.
    assert re.search(r"loss is not finite \(nan\) at step 5 \(epoch 1, batch 1, rank [01]\)", line)
    assert "bad inputs: the batch at step 5 (epoch 1, batch 1, rank 1) contains NaN" in line
    checkpoints = {c.name: c for c in tmp_path.rglob("*.ckpt")}  # epoch 0's, before the NaN
    assert set(checkpoints) == {"epoch=0-step=4.ckpt", "last.ckpt"}
    assert any(str(c) in line for c in checkpoints.values())


# ---------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    build_cli(["fit", *_common(root), "--trainer.max_epochs", "1"])
    (checkpoint,) = (p for p in root.rglob("*.ckpt") if p.name != "last.ckpt")
    return checkpoint


@pytest.mark.parametrize("command", ["fit", "test"])
def test_checkpoint_with_other_candidates_is_a_clear_error(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, line = _cli_error([command, *_common(tmp_path), "--ckpt_path", str(trained),
                             "--model.flexact.candidates",
                             "[relu,tanh,sigmoid,identity,leaky_relu]"],
                            capsys)
    assert code == 2
    assert str(trained) in line
    assert ("trained with candidates ['relu', 'sigmoid', 'tanh', 'leaky_relu', 'identity'], "
            "but the model is configured with ['relu', 'tanh', 'sigmoid', 'identity', "
            "'leaky_relu']") in line


def test_trainer_resume_with_other_candidates_names_the_layer(trained: Path,
                                                              tmp_path: Path) -> None:
    """Without the CLI (or for layers the hyper-parameters do not describe): the state dict."""
    model = FlexActRegressor(in_features=4, flexact={"candidates": [
        "relu", "tanh", "sigmoid", "identity", "leaky_relu"]})
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False,
                        enable_progress_bar=False)
    with pytest.raises(ConfigError, match=r"FlexAct layer 'model\.head\.flexact': the "
                                          r"checkpoint was trained with candidates "
                                          r"\['relu', 'sigmoid'"):
        trainer.fit(model, SyntheticDataModule(n_train=160, batch_size=32), ckpt_path=trained)


def test_layer_checks_candidates_and_loads_old_state_dicts() -> None:
    saved = FlexAct().state_dict()
    assert saved["_extra_state"] == {"candidates": ["relu", "sigmoid", "tanh", "leaky_relu",
                                                    "identity"]}
    with pytest.raises(ConfigError, match=r"\['relu', 'tanh'\]"):
        FlexAct(candidates=["relu", "tanh"]).load_state_dict(saved)
    old = {k: v for k, v in saved.items() if k != "_extra_state"}  # before the extra state
    layer = FlexAct()
    layer.load_state_dict(old)  # strict, and still fine
    assert torch.equal(layer.logits, saved["logits"])
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({"temperature": saved["temperature"]})  # strictness kept


def test_checkpoint_without_candidate_names_still_resumes(trained: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(trained, weights_only=True)
    del checkpoint["state_dict"]["model.head.flexact._extra_state"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    cli = build_cli(["fit", *_common(tmp_path), "--trainer.max_epochs", "2",
                     "--ckpt_path", str(old)])
    assert cli.trainer.global_step == 10


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_unusable_checkpoint_is_a_clear_error(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    path = tmp_path / "damaged.ckpt"
    if damage == "truncated":
        path.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint" * 100)
    code, line = _cli_error(["fit", *_common(tmp_path), "--ckpt_path", str(path)], capsys)
    assert code == 2
    expected = "checkpoint not found" if damage == "missing" else "is truncated or corrupt"
    assert expected in line and str(path) in line


def test_checkpoint_write_interrupted_by_an_error_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)

    def crash(obj: object, handle: Any) -> None:
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


_KILLED_WRITER = """
import os, sys, torch
from flexact.cli.checkpoint import AtomicCheckpointIO
real_save = torch.save
def dying_save(obj, handle):
    real_save(obj, handle)
    handle.flush()
    os.ftruncate(handle.fileno(), 100)  # only part of the data reached the disk
    os._exit(9)  # killed mid-write (SIGKILL, power loss, preemption)
torch.save = dying_save
AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(1000)}, sys.argv[1])
"""


def test_checkpoint_write_killed_midway_keeps_the_old_one(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_KILLED_WRITER))
    out = subprocess.run([sys.executable, str(script), str(path)], env=clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 9, out.stderr
    assert io.load_checkpoint(path)["step"] == 1  # the old checkpoint, complete
    leftovers = [p for p in tmp_path.iterdir() if p.name not in {"last.ckpt", "writer.py"}]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.")
    assert leftovers[0].suffix == ".tmp"  # never matched as a checkpoint (*.ckpt, last*.ckpt)


def test_flexact_runs_write_checkpoints_atomically_by_default(tmp_path: Path) -> None:
    cli = build_cli(["fit", *_common(tmp_path), "--trainer.fast_dev_run", "1"])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer = L.Trainer(plugins=[AtomicCheckpointIO()], logger=False)
    assert not use_atomic_checkpoints(trainer)  # already there
    custom = type("CustomIO", (TorchCheckpointIO,), {})()
    trainer = L.Trainer(plugins=[custom], logger=False)
    assert not use_atomic_checkpoints(trainer) and trainer.strategy.checkpoint_io is custom
    assert use_atomic_checkpoints(L.Trainer(logger=False))


# ---------------------------------------------------------------------------- bad config values
_CALLBACK_CONFIG = """
trainer:
  callbacks:
    - class_path: {cls}
      init_args:
        {key}: {value}
"""


@pytest.mark.parametrize(("override", "key"), [
    (["--data.k", "-1"], "k"),
    (["--data.k", "five"], "k"),
    (["--data.batch_size", "0"], "batch_size"),
    (["--data.n_train", "ten"], "n_train"),
    (["--data.noise", "-0.5"], "noise"),
    (["--data.num_workers", "-1"], "num_workers"),
    (["--model.hidden_features", "0"], "hidden_features"),
    (["--model.sync_statistics", "maybe"], "sync_statistics"),
    ("FiniteGuard check_every_n_steps 0", "check_every_n_steps"),
    ("FiniteGuard check_inputs sometimes", "check_inputs"),
    ("TemperatureAnnealing end 0", "end"),
    ("TemperatureAnnealing schedule wavy", "schedule"),
    ("TemperatureAnnealing warmup -3", "warmup"),
    ("SelectionCommit at 1.5", "at"),
    ("SelectionCommit interval batch", "interval"),
    ("SelectionLogger every_n_steps 0", "every_n_steps"),
])
def test_bad_value_fails_at_parse_time_naming_the_key(
    override: list[str] | str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if isinstance(override, str):
        cls, name, value = override.split()
        extra = tmp_path / "bad.yaml"
        extra.write_text(_CALLBACK_CONFIG.format(cls=cls, key=name, value=value))
        override = ["--config", str(extra)]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", SYNTHETIC, *override, "--print_config"])  # parse only
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    (line,) = err.splitlines()  # one line naming the key, without the usage
    assert line.startswith("flexact: error: ") and f".{key}" in line and "must be" in line
    assert "Traceback" not in err


def test_environment_has_no_launcher_variables() -> None:
    """The DDP subprocesses start their own group; nothing leaks from a surrounding one."""
    assert not {"MASTER_PORT", "RANK", "WORLD_SIZE"} & set(clean_env())
    assert str(REPO) in clean_env()["PYTHONPATH"].split(os.pathsep)


@pytest.mark.parametrize(("override", "key"), [
    (["--model.flexact.kl_lambda", "0"], "kl_lambda"),
    (["--model.flexact.prior", "[1,-1,1,1,1]"], "prior"),
    (["--model.flexact.eval_mode", "mean"], "eval_mode"),
    (["--model.flexact.tau", "-2"], "tau"),
])
def test_bad_flexact_setting_fails_before_training(
    override: list[str], key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The FlexActSpec checks its fields when it is built (the core has no parser types)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", SYNTHETIC, *override, "--trainer.fast_dev_run", "1",
              "--trainer.default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before training

