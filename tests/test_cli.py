from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flexact.cli import build_cli, main
from flexact.modules import FlexActRegressor

from .conftest import CONFIGS, REPO

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_configs_exist() -> None:
    assert "synthetic.yaml" in [c.name for c in CONFIGS]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_every_key_is_commented(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("flexact.")
    for line in config.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line, f"{config.name}: key without a comment: {line!r}"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with tiny CIFAR-10, MNIST and review polarity sets in the real formats."""
    from flexact.tools.fake_data import write_cifar10, write_mnist, write_review_polarity

    root = tmp_path_factory.mktemp("tiny_data")
    write_cifar10(root, n_train_per_class=1, n_test_per_class=1)
    write_mnist(root, n_train_per_class=1, n_test_per_class=1, compress=True)
    write_review_polarity(root, n_per_class=5)
    return root


def _tiny_data_overrides(config: Path, data_dir: Path) -> list[str]:
    """Point a config that reads real data (it has data.init_args.data_dir) at the tiny sets."""
    data = yaml.safe_load(config.read_text())
    while "data" not in data and "extends" in data:  # the data section of the base config
        config = config.parent / data["extends"]
        data = yaml.safe_load(config.read_text())
    init_args = (data.get("data") or {}).get("init_args") or {}
    if "data_dir" not in init_args:
        return []
    overrides = ["--data.data_dir", str(data_dir), "--data.download", "false",
                 "--data.batch_size", "2"]
    if "max_length" in init_args:
        overrides += ["--data.max_length", "50"]
    return overrides


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_runs_fast_dev_run(config: Path, tmp_path: Path, tiny_data: Path) -> None:
    cli = build_cli(["fit", "--config", str(config), "--trainer.fast_dev_run", "1",
                     "--trainer.default_root_dir", str(tmp_path), *QUIET,
                     *_tiny_data_overrides(config, tiny_data)])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1


def test_fit_then_test_and_predict_from_checkpoint(tmp_path: Path) -> None:
    config = str(REPO / "configs" / "synthetic.yaml")
    common = ["--config", config, "--trainer.default_root_dir", str(tmp_path), *QUIET,
              "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--data.n_train", "256", "--data.n_val", "64", "--data.n_test", "64"]
    cli = build_cli(["fit", *common, "--trainer.max_epochs", "2"])
    model = cli.model
    assert isinstance(model, FlexActRegressor) and model.head.linear.in_features == 4
    assert cli.trainer.checkpoint_callback is not None
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    assert Path(ckpt).exists()
    selection = json.loads((Path(cli.trainer.log_dir or "") / "selection.json").read_text())
    assert selection["head.flexact"]["pick"] == model.head.flexact.selected()[0]
    tested = build_cli(["test", *common, "--ckpt_path", ckpt])
    assert "test_mse" in tested.trainer.callback_metrics
    predicted = build_cli(["predict", *common, "--ckpt_path", ckpt])
    assert predicted.trainer.state.finished
    reloaded = FlexActRegressor.load_from_checkpoint(ckpt)  # hparams hold configs, not code
    assert reloaded.head.flexact.selected() == model.head.flexact.selected()


def test_data_sizes_link_into_the_model(tmp_path: Path) -> None:
    cli = build_cli(["fit", "--config", str(REPO / "configs" / "synthetic.yaml"),
                     "--data.n_features", "7", "--trainer.fast_dev_run", "1",
                     "--trainer.default_root_dir", str(tmp_path), *QUIET])
    assert cli.model.head.linear.in_features == 7


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.flexact.candidates", "[relu,swishy]"], "unknown activation 'swishy'"),
        (["--data.truth", "softsign"], "unknown activation 'softsign'"),
        (["--model.flexact.candidates", "[relu,relu]"], "duplicate candidates"),
        (["--model.flexact.tau", "0"], "tau must be a finite number > 0, got 0"),
        (["--model.flexact.tau", "-1"], "tau must be a finite number > 0, got -1"),
        (["--model.alpha", "-0.1"], "model.init_args.alpha (--model.alpha on the command line): "
                                    "must be a number >= 0, got -0.1"),
        (["--model.flexact.granularity", "pixel"], "'layer', 'channel'"),
    ],
)
def test_bad_cli_input_fails_with_a_clear_message(
    override: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "synthetic.yaml"),
              "--trainer.default_root_dir", str(tmp_path), *override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_version_and_module_entry_point() -> None:
    import flexact

    out = subprocess.run([sys.executable, "-m", "flexact", "--version"], capture_output=True,
                         text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == f"flexact {flexact.__version__}"
    helped = subprocess.run([sys.executable, "cli.py", "fit", "--help"], capture_output=True,
                            text=True, check=True, cwd=REPO)
    assert "--model" in helped.stdout and "--data" in helped.stdout


def test_help_shows_docstrings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "FlexActRegressor"])
    out = capsys.readouterr().out
    assert "Weight α of the selection KL" in out
    assert "Gumbel-Softmax temperature" in out


@pytest.mark.slow
@pytest.mark.parametrize("truth", ["relu", "sigmoid", "tanh", "leaky_relu", "identity"])
def test_quick_start_recovers_each_truth(truth: str, tmp_path: Path) -> None:
    """The README's main job: each truth picked (ReLU too, not its near-twin LeakyReLU)."""
    out = subprocess.run(
        [sys.executable, "-m", "flexact", "fit", "--config", "configs/synthetic.yaml",
         "--data.truth", truth, "--trainer.default_root_dir", str(tmp_path),
         "--trainer.logger.init_args.save_dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=True,
    )
    log = out.stdout + out.stderr
    assert "FlexAct selection" in log and "Epoch 19" in log  # table printed, progress bar shown
    (path,) = tmp_path.rglob("selection.json")
    selection = json.loads(path.read_text())["head.flexact"]
    assert selection["pick"] == truth  # the README's quick start says so, for each truth
    assert selection["commit_check"]["chosen"] == truth  # the config checks its pick (verify)
    # ... and restarts the optimizer there (reset_optimizer): Adam counts from the commit.
    (last,) = tmp_path.rglob("last.ckpt")
    checkpoint = torch.load(last, weights_only=False)
    counts = {int(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()}
    assert counts == {checkpoint["global_step"] - selection["committed_at"]}


def test_root_help_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "flexact plot", "flexact export",
                    "flexact probe"):
        assert command in out
