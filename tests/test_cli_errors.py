"""Bad input and faults through the real ``flexact`` command: one line each, nothing written.

Every case of the matrix runs ``flexact.cli.main`` in-process and must exit non-zero with one
``flexact: error:`` line that names what was wrong and what to do: no traceback, no usage dump,
no file written under the run's folder, and the files it was given left as they were.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from flexact.callbacks import TemperatureAnnealing
from flexact.cli import FlexActCLI, build_cli, main
from flexact.modules import FlexActRegressor

from .conftest import REPO
from .test_data_images import dead_url  # noqa: F401 - a fixture: a port where nothing listens

SYNTHETIC = str(REPO / "configs" / "synthetic.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
LIGHTNING_INFO = ("Seed set to", "GPU available", "TPU available", "HPU available",
                  "💡", "LOCAL_RANK", "You are using", "Restoring states", "Restored all")


def _run_args(root: Path, *extra: str, config: str = SYNTHETIC) -> list[str]:
    return ["fit", "--config", config, "--trainer.default_root_dir", str(root / "run"),
            "--trainer.logger.init_args.save_dir", str(root / "run"), "--data.n_train", "64",
            "--data.n_val", "32", "--data.n_test", "32", "--data.batch_size", "32",
            "--trainer.max_steps", "2", *QUIET, *extra]


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def _one_line(args: list[str], capsys: pytest.CaptureFixture[str], code: int = 2,
              keep: list[Path] | None = None, run_root: Path | None = None) -> str:
    """Run ``args``; check the exit status, the single error line, and that nothing changed."""
    before = _digest(keep or [])
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    err = captured.err
    assert exit_info.value.code == code, err
    assert "Traceback" not in err and "usage:" not in err and "tip:" not in err, err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith(LIGHTNING_INFO)]
    assert len(lines) == 1 and lines[0].startswith("flexact: error: "), err
    assert _digest(keep or []) == before  # the files the run was given are untouched
    if run_root is not None:
        written = [p for p in run_root.rglob("*") if p.is_file()] if run_root.exists() else []
        assert not written, written
    return lines[0].removeprefix("flexact: error: ")


def _write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


# ------------------------------------------------------------------------ parse-time matrix
# (name, files to write {name: YAML}, extra arguments, substrings the line must hold)
PARSE_CASES: list[tuple[str, dict[str, str], list[str], list[str]]] = [
    ("malformed-yaml", {"bad.yaml": "model:\n  init_args:\n    alpha: [0.3\n"},
     ["--config", "{bad.yaml}"], ["bad.yaml, line 4", "not valid YAML", "fix the file"]),
    ("misspelt-key-in-file", {"k.yaml": "model:\n  init_args:\n    flexact:\n      kl_lamda: 1\n"},
     ["--config", "{k.yaml}"],
     ["unknown key model.init_args.flexact.kl_lamda in", "k.yaml", "did you mean kl_lambda?"]),
    ("misspelt-key-on-command-line", {}, ["--model.flexact.kl_lamda", "0.3"],
     ["model.init_args.flexact.kl_lamda (--model.flexact.kl_lamda on the command line)",
      "did you mean kl_lambda?"]),
    ("zero-tau-in-file", {"t.yaml": "model:\n  init_args:\n    flexact:\n      tau: 0\n"},
     ["--config", "{t.yaml}"],
     ["tau must be a finite number > 0, got 0.0 (model.init_args.flexact.tau in", "t.yaml)"]),
    ("zero-annealing-end", {}, ["--temperature.end", "0"],
     ["temperature.end (--temperature.end on the command line): must be a number > 0, got 0"]),
    ("abbreviated-option", {}, ["--trainer.max_epoch", "3"],
     ["unknown key trainer.max_epoch", "did you mean max_epochs?"]),
    ("misspelt-trainer-key-in-file", {"t.yaml": "trainer:\n  max_epoch: 3\n"},
     ["--config", "{t.yaml}"], ["unknown key trainer.max_epoch in", "did you mean max_epochs?"]),
    ("misspelt-section", {"s.yaml": "datta:\n  batch_size: 3\n"}, ["--config", "{s.yaml}"],
     ["unknown key datta in", "did you mean data?"]),
    ("misspelt-model-argument", {}, ["--model.init_args.hiden_features", "3"],
     ["unknown key model.init_args.hiden_features", "did you mean hidden_features?"]),
    ("misspelt-optimizer-argument",
     {"o.yaml": "model:\n  init_args:\n    optimizer:\n      init_args:\n        lrr: 3\n"},
     ["--config", "{o.yaml}"],
     ["unknown key model.init_args.optimizer.init_args.lrr in", "did you mean lr?"]),
    ("misspelt-data-argument", {}, ["--data.n_trian", "3"],
     ["unknown key data.init_args.n_trian", "did you mean n_train?"]),
    ("legacy-flat-settings",
     {"old.yaml": "model:\n  init_args:\n    candidates: [relu, tanh]\n    tau: 0.5\n"
                  "    kl_lambda: 0.3\n"},
     ["--config", "{old.yaml}"],
     ["moved to model.init_args.flexact.candidates", "candidates, tau, kl_lambda",
      "old.yaml"]),
    ("legacy-flat-setting-on-command-line", {}, ["--model.init_args.tau", "0.5"],
     ["model.init_args.tau (--model.init_args.tau on the command line) moved to "
      "model.init_args.flexact.tau"]),
    ("misspelt-model-class", {}, ["--model", "FlexActRegresor"],
     ["unknown class 'FlexActRegresor'", "did you mean FlexActRegressor?"]),
    ("misspelt-callback-class",
     {"c.yaml": "trainer:\n  callbacks:\n    - class_path: SelectionLoger\n"},
     ["--config", "{c.yaml}"], ["unknown class 'SelectionLoger'", "did you mean SelectionLogger?"]),
    ("bad-choice", {}, ["--model.flexact.granularity", "pixel"],
     ["model.init_args.flexact.granularity", "must be one of 'layer', 'channel', got 'pixel'"]),
    ("bad-bool", {}, ["--model.sync_statistics", "maybe"],
     ["model.init_args.sync_statistics", "must be true or false, got 'maybe'"]),
    ("bad-int", {}, ["--data.n_train", "ten"],
     ["data.init_args.n_train", "must be a positive int, got 'ten'"]),
    ("negative-weight", {}, ["--model.alpha", "-0.1"],
     ["model.init_args.alpha", "must be a number >= 0, got -0.1"]),
    ("warmup-past-the-run", {}, ["--model.selection_warmup", "1.5"],
     ["selection_warmup must be in [0, 1)", "got 1.5", "--model.selection_warmup"]),
    ("commit-inside-the-warmup", {}, ["--model.selection_warmup", "0.8"],
     ["SelectionCommit commits at 0.7", "held fixed until 0.8"]),
    ("annealing-through-trainer-callbacks", {}, ["--trainer.callbacks.init_args.end", "1e-6"],
     ["TemperatureAnnealing is set under `temperature:`", "give --temperature.end"]),
    ("callback-argument-in-file",
     {"g.yaml": "finite_guard:\n  check_every_n_steps: 0\n"}, ["--config", "{g.yaml}"],
     ["finite_guard.check_every_n_steps in", "must be a positive int, got 0"]),
    ("missing-config-file", {}, ["--config", "{nowhere.yaml}"],
     ["config file not found:", "nowhere.yaml"]),
    ("extends-missing-file", {"e.yaml": "extends: base_missing.yaml\n"},
     ["--config", "{e.yaml}"], ["extends", "base_missing.yaml, which does not exist"]),
    ("extends-circle", {"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"},
     ["--config", "{a.yaml}"], ["extend each other in a circle"]),
    ("annealing-configured-twice",
     {"twice.yaml": "trainer:\n  callbacks:\n    - class_path: TemperatureAnnealing\n"},
     ["--config", "{twice.yaml}", "--temperature.end", "0.1"],
     ["TemperatureAnnealing is configured twice", "keep one"]),
]


@pytest.mark.parametrize(("files", "extra", "expected"), [c[1:] for c in PARSE_CASES],
                         ids=[c[0] for c in PARSE_CASES])
def test_bad_input_is_one_line_and_writes_nothing(
    files: dict[str, str], extra: list[str], expected: list[str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    paths = {name: inputs / name for name in files}
    for name, text in files.items():
        paths[name].write_text(text)
    args = []
    for arg in extra:
        for name in [*files, "nowhere.yaml"]:
            arg = arg.replace("{" + name + "}", str(inputs / name))
        args.append(arg)
    line = _one_line(_run_args(tmp_path, *args), capsys, keep=list(paths.values()),
                     run_root=tmp_path / "run")
    for text in expected:
        assert text in line, line


def test_unknown_subcommand_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line(["fitt", "--config", SYNTHETIC], capsys)
    assert "invalid choice: 'fitt'" in line and "--help" in line


# ------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the synthetic regressor (two steps), saved outside any run folder."""
    root = tmp_path_factory.mktemp("trained")
    cli = build_cli([*_run_args(root), "--trainer.logger", "false"])
    cli.trainer.save_checkpoint(root / "good.ckpt")
    return root / "good.ckpt"


@pytest.fixture(scope="module")
def classifier(trained: Path) -> Path:
    """The same checkpoint, claiming to be a FlexActClassifier (another model's checkpoint)."""
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "flexact.modules.FlexActClassifier"
    path = trained.with_name("classifier.ckpt")
    torch.save(checkpoint, path)
    return path


def _flipped(source: Path, target: Path, offset: int = 300) -> Path:
    data = bytearray(source.read_bytes())
    for i in range(offset, offset + 16):  # inside the pickle: the archive stays a valid zip
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize(("extra", "expected"), [
    (["--model.init_args.hidden_features", "8"],
     ["model.init_args.hidden_features (checkpoint: null, config: 8)", "leave out --ckpt_path"]),
    (["--model.flexact.tau", "0.5", "--model.flexact.granularity", "channel"],
     ["model.init_args.flexact.tau (checkpoint: 1.0, config: 0.5)",
      "model.init_args.flexact.granularity (checkpoint: 'layer', config: 'channel')"]),
    (["--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.1"],
     ["model.init_args.optimizer.class_path (checkpoint: 'torch.optim.Adam'"]),
], ids=["one-key", "two-keys", "other-optimizer"])
def test_resume_with_other_settings_lists_the_keys(
    extra: list[str], expected: list[str], trained: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    line = _one_line(_run_args(tmp_path, "--ckpt_path", str(trained), *extra), capsys,
                     keep=[trained], run_root=tmp_path / "run")
    assert f"the checkpoint {trained} was trained with other model settings" in line
    for text in expected:
        assert text in line, line


def _damaged(kind: str, trained: Path, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "flipped":
        _flipped(trained, path)
    elif kind == "truncated":
        path.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(b"not a checkpoint" * 64)
    return path


@pytest.mark.parametrize(("kind", "expected"), [
    ("flipped", "is truncated or corrupt (the bytes of archive/data.pkl do not match"),
    ("truncated", "is truncated or corrupt (not a complete zip archive)"),
    ("garbage", "is truncated or corrupt"),
    ("missing", "checkpoint not found"),
])
@pytest.mark.parametrize("command", ["fit", "test"])
def test_damaged_checkpoint_is_one_line_naming_it(
    kind: str, expected: str, command: str, trained: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    path = _damaged(kind, trained, tmp_path)
    args = _run_args(tmp_path, "--ckpt_path", str(path))
    line = _one_line([command, *args[1:]], capsys, keep=[path], run_root=tmp_path / "run")
    assert expected in line and str(path) in line
    assert kind == "missing" or "use another checkpoint" in line


@pytest.mark.parametrize("command", ["fit", "test"])
def test_checkpoint_of_another_model_names_it(
    command: str, classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _run_args(tmp_path, "--ckpt_path", str(classifier))
    line = _one_line([command, *args[1:]], capsys, keep=[classifier], run_root=tmp_path / "run")
    assert (f"the checkpoint {classifier} holds a FlexActClassifier, but the config builds a "
            "FlexActRegressor") in line


def test_checkpoint_whose_model_does_not_fit_the_data_names_it(
    classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No model in the config: the checkpoint's is built, and fails on this data's sizes."""
    args = ["fit", "--model", "FlexActClassifier", "--data", "SyntheticDataModule",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
            "--ckpt_path", str(classifier)]
    line = _one_line(args, capsys, keep=[classifier], run_root=tmp_path / "run")
    assert f"the model saved in the checkpoint {classifier} cannot be built" in line
    assert "num_classes >= 2" in line and "its run's config.yaml" in line


@pytest.mark.parametrize("kind", ["flipped", "missing"])
def test_export_of_a_damaged_checkpoint_is_one_line(
    kind: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _damaged(kind, trained, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(path), "--out", str(tmp_path / "out" / "model.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    (line,) = err.splitlines()
    assert line.startswith("flexact export: error: checkpoint ") and str(path) in line
    assert not (tmp_path / "out").exists()


def test_safe_changes_on_resume_warn_and_apply(trained: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cli = build_cli([*_run_args(tmp_path, "--ckpt_path", str(trained), "--trainer.max_steps",
                                "3", "--trainer.logger", "false"),
                     "--model.flexact.kl_lambda", "0.5", "--model.optimizer.init_args.lr", "0.01"])
    err = capsys.readouterr().err
    (warning,) = [x for x in err.splitlines() if x.startswith("flexact: warning:")]
    assert "model.init_args.flexact.kl_lambda 0.3 → 0.5" in warning
    assert "model.init_args.optimizer.init_args.lr 0.05 → 0.01" in warning
    assert cli.model.model.head.flexact.kl_lambda == 0.5
    # Not restored; the selection logits' group keeps its selection_lr_scale × the new lr.
    groups = cli.trainer.optimizers[0].param_groups
    lrs = {g.get("selection_lr_scale", 1.0): g["lr"] for g in groups}
    assert lrs == {1.0: 0.01, 5.0: pytest.approx(0.05)}  # the head's starting 5×
    assert cli.trainer.global_step == 3  # resumed at step 2
    from flexact.cli.resume import SAFE_TO_CHANGE  # the documented list

    assert {"alpha", "flexact.kl_lambda", "optimizer.init_args.lr"} <= set(SAFE_TO_CHANGE)


# ------------------------------------------------------------------------ runtime faults
@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can write to: chmod for users, the immutable flag for root."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif not shutil.which("chattr") or subprocess.run(
            ["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only folder here (root without chattr +i)")
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=False)
    folder.chmod(0o755)


def test_read_only_log_folder_is_one_line_naming_it(
    read_only: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit", "--config", SYNTHETIC, "--trainer.default_root_dir", str(read_only / "run"),
            "--trainer.logger.init_args.save_dir", str(read_only), "--data.n_train", "64",
            "--trainer.max_steps", "2", *QUIET]
    line = _one_line(args, capsys)
    assert line.startswith(f"cannot write {read_only}") and "--trainer.default_root_dir" in line
    assert not list(read_only.iterdir())


@pytest.mark.parametrize(("config", "option"), [
    ("resnet18.yaml", "--data.url"),
    ("textcnn_mr.yaml", "--data.url"),
    ("lenet5_mnist.yaml", "--data.mirrors"),
])
def test_failed_download_leaves_no_new_folder(
    config: str, option: str, tmp_path: Path, dead_url: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "new" / "data"
    url = f"[{dead_url}]" if option == "--data.mirrors" else dead_url + "archive.tar.gz"
    line = _one_line(["fit", "--config", str(REPO / "configs" / config), "--data.data_dir",
                      str(data_dir), option, url, "--trainer.default_root_dir",
                      str(tmp_path / "run"), "--trainer.logger", "false"], capsys)
    assert "could not download" in line and "check the network connection" in line
    assert not (tmp_path / "new").exists() and not (tmp_path / "run").exists()


def test_diverged_run_names_the_annealing_option(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line(_run_args(tmp_path, "--trainer.logger", "false", "--temperature.end",
                               "null", "--model.flexact.tau", "1e-40"), capsys, code=1)
    assert "τ too small" in line and "(--temperature.end)" in line
    assert "(--model.flexact.tau)" in line


# ------------------------------------------------------------------------ what now works
class MyData(LightningDataModule):
    """A user's own data module with a plain ``int`` batch size."""

    num_features = 4
    num_outputs = 1

    def __init__(self, batch_size: int = 32, n: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size
        x = torch.randn(n, 4)
        self.data = TensorDataset(x, torch.tanh(x[:, :1]))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


class _MeanSquare(torch.nn.Module):
    """A loss with no ``reduction``: no per-sample errors to check a pick with."""

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs - targets).square().mean()


class NoPerSampleRegressor(FlexActRegressor):
    """A user's regressor whose loss cannot be taken per sample."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.criterion = _MeanSquare()


def test_a_check_the_module_cannot_take_is_one_line_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """configs/synthetic.yaml checks its picks (verify: true); a module without per-sample
    errors is refused when the trainer is built, not at train start after the logs exist."""
    line = _one_line(_run_args(tmp_path, "--model", "tests.test_cli_errors.NoPerSampleRegressor"),
                     capsys, run_root=tmp_path / "run")
    assert "SelectionCommit(verify=True)" in line and "NoPerSampleRegressor" in line
    assert "set verify: false" in line


def test_own_data_module_over_a_config(tmp_path: Path) -> None:
    """The config's PositiveInt batch size carried over to MyData's ``int`` one is saved."""
    cli = build_cli([*_run_args(tmp_path), "--data", "tests.test_cli_errors.MyData"])
    assert cli.trainer.global_step == 2 and cli.datamodule.batch_size == 32
    (saved,) = (tmp_path / "run").rglob("config.yaml")
    data = yaml.safe_load(saved.read_text())["data"]
    assert data == {"class_path": "tests.test_cli_errors.MyData",
                    "init_args": {"batch_size": 32, "n": 64}}


def _annealing(cli: FlexActCLI) -> list[TemperatureAnnealing]:
    return [c for c in cli.trainer.callbacks if isinstance(c, TemperatureAnnealing)]


def test_the_annealing_is_reached_from_the_command_line(tmp_path: Path) -> None:
    cli = build_cli([*_run_args(tmp_path, "--trainer.logger", "false"),
                     "--temperature.end", "1e-6", "--temperature.schedule", "linear"])
    (annealing,) = _annealing(cli)
    assert annealing.end == 1e-6 and annealing.schedule == "linear"
    assert cli.model.model.head.flexact.tau == pytest.approx(1 - (1 - 1e-6) / 2)  # step 1 of 2
    started = build_cli([*_run_args(tmp_path / "b", "--trainer.logger", "false"),
                         "--model.flexact.tau", "0.5", "--temperature.schedule", "constant"])
    assert started.model.model.head.flexact.tau == 0.5  # start: null is the model's τ


def test_annealing_in_trainer_callbacks_still_works(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("trainer:\n  callbacks:\n    - class_path: TemperatureAnnealing\n"
                   "      init_args: {start: 2.0, end: 0.5, schedule: linear}\n"
                   "temperature: {end: null}\n")
    cli = build_cli([*_run_args(tmp_path, "--trainer.logger", "false"), "--config", str(old)])
    (annealing,) = _annealing(cli)  # it took the place of the one under temperature:
    assert (annealing.start, annealing.end) == (2.0, 0.5)
    assert cli.model.model.head.flexact.tau == pytest.approx(1.25)


def test_no_lightning_tips(tmp_path: Path) -> None:
    """A real process: under pytest, Lightning's info messages go to pytest's log capture."""
    out = subprocess.run([sys.executable, "-m", "flexact", *_run_args(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env=_clean_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Trainer.fit` stopped" in out.stdout + out.stderr  # Lightning's info is shown
    assert "💡" not in out.stdout + out.stderr and "litlogger" not in out.stderr


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_top_level_help_does_not_import_lightning() -> None:
    script = ("import runpy, sys; sys.argv = ['flexact', '--help']\n"
              "try:\n    runpy.run_module('flexact', run_name='__main__')\n"
              "except SystemExit:\n    pass\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('lightning', 'jsonargparse', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, check=True, timeout=60)
    assert out.stdout.strip().endswith("[]"), out.stdout
    for command in ("fit", "validate", "test", "predict", "flexact plot", "flexact export"):
        assert command in out.stdout


def test_top_level_help_lists_the_cli_subcommands() -> None:
    from flexact.__main__ import ROOT_HELP

    assert all(f"    {name} " in ROOT_HELP for name in FlexActCLI.subcommands())
