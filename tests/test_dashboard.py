from __future__ import annotations

import csv
import itertools
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from flexact import FlexAct
from flexact.callbacks import RNGState, SelectionLogger, TemperatureAnnealing
from flexact.callbacks.selection_reports import add_heatmap
from flexact.cli import main
from flexact.datamodules import SyntheticDataModule
from flexact.modules import FlexActRegressor
from flexact.tools.plot import plot_layer, read_history

from .conftest import REPO

CANDIDATES = ["relu", "sigmoid", "tanh", "leaky_relu", "identity"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-epoch run with two FlexAct layers (one per-channel) and TensorBoard."""
    root = tmp_path_factory.mktemp("dashboard")
    L.seed_everything(0)
    backbone = nn.Sequential(nn.Linear(4, 6),
                             FlexAct(granularity="channel", num_channels=6, channel_dim=1))
    model = FlexActRegressor(backbone=backbone, in_features=6, hidden_features=5)
    dm = SyntheticDataModule(truth="tanh", n_train=256, n_val=64, batch_size=32)
    logger = TensorBoardLogger(root, name="run", version=0)
    trainer = L.Trainer(
        default_root_dir=root, logger=logger, max_epochs=3, accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        log_every_n_steps=1,
        callbacks=[TemperatureAnnealing(start=1.0, end=0.2), SelectionLogger(every_n_steps=4)],
    )
    trainer.fit(model, dm)
    return Path(logger.log_dir)


def _accumulator(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0,
                                                         "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_event_files_hold_layout_series_tau_and_heatmap(run_dir: Path) -> None:
    acc = _accumulator(run_dir)
    tags = acc.Tags()
    layers = ["backbone.1", "head.flexact"]
    for layer in layers:
        for cand in CANDIDATES:
            assert f"selection/{layer}/{cand}" in tags["scalars"]
        assert f"selection/{layer}/entropy" in tags["scalars"]
    # custom scalars: per layer a category with one single-tag chart per candidate and one of
    # the entropy (each line of a chart is then a run), plus τ
    charts = _layout_charts(acc)
    assert list(charts) == [*(f"FlexAct selection: {layer}" for layer in layers),
                            "FlexAct training"]
    for layer in layers:
        category = charts[f"FlexAct selection: {layer}"]
        assert list(category) == [*CANDIDATES, "selection entropy"]
        for chart, (pattern,) in category.items():
            tag = f"selection/{layer}/{'entropy' if chart == 'selection entropy' else chart}"
            assert [t for t in tags["scalars"] if re.match(pattern, t)] == [tag]
    assert charts["FlexAct training"] == {"temperature τ": [r"tau$"]}
    taus = [event.value for event in acc.Scalars("tau")]
    assert len(taus) > 20 and taus[0] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(taus))  # strictly annealing
    heatmaps = acc.Images("selection/heatmap")
    assert len(heatmaps) == 3  # one per epoch
    assert heatmaps[0].width > 100 and heatmaps[0].height > 50
    assert "selection/backbone.1/relu/channels" in tags["histograms"]
    assert "selection/head.flexact/relu/channels" not in tags["histograms"]  # per-layer layer
    assert any(t.startswith("selection/final") for t in tags["tensors"])


def _layout_charts(acc: EventAccumulator) -> dict[str, dict[str, list[str]]]:
    """The custom-scalars layout: ``{category: {chart: [tag patterns]}}``."""
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    return {category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
            for category in layout.category}


def test_history_csv_plots_and_json(run_dir: Path) -> None:
    with open(run_dir / "selection_history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {"step", "epoch", "layer", "candidate", "probability", "tau"}
    head = [r for r in rows if r["layer"] == "head.flexact" and r["candidate"] == "tanh"]
    steps = [int(r["step"]) for r in head]
    assert steps[0] == 0 and steps == sorted(set(steps)) and steps[-1] == 24
    assert float(head[-1]["epoch"]) == pytest.approx(3.0)
    taus = [float(r["tau"]) for r in head]
    assert taus[0] > taus[-1]
    history = read_history(run_dir / "selection_history.csv")
    assert history.layers == ["backbone.1", "head.flexact"]
    for layer in history.layers:
        png = run_dir / f"selection_{layer}.png"
        image = plt.imread(png)
        assert image.shape[0] > 200 and image.shape[1] > 300
    selection = json.loads((run_dir / "selection.json").read_text())
    assert sum(selection["backbone.1"]["pick_counts"].values()) == 6


def test_plot_lines_and_overlay_command(run_dir: Path, tmp_path: Path) -> None:
    history = read_history(run_dir / "selection_history.csv")
    fig = plot_layer([history], "head.flexact")
    assert len(fig.axes[0].get_lines()) == 5
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == CANDIDATES
    overlay = plot_layer([history, history], "head.flexact", labels=["α=0.3", "α=0"])
    lines = overlay.axes[0].get_lines()
    assert len(lines) == 10 and {line.get_linestyle() for line in lines} == {"-", "--"}
    csv_path = str(run_dir / "selection_history.csv")
    main(["plot", csv_path, "--compare", csv_path, "--labels", "a", "b", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "selection_backbone.1.png", "selection_head.flexact.png"]
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path / "missing.csv")])
    assert exit_info.value.code == 2


def _synthetic_run(root: Path, ckpt_path: Path | None = None) -> Path:
    """3 epochs of 5 steps with TensorBoard, selection recorded every 2 steps, checkpoints
    every 3 steps and after every epoch; returns the run's log directory."""
    L.seed_everything(0)
    step_checkpoints = ModelCheckpoint(dirpath=root / "steps", filename="{step}",
                                       every_n_train_steps=3, save_top_k=-1)
    epoch_checkpoints = ModelCheckpoint(dirpath=root / "epochs", filename="{epoch}",
                                        every_n_epochs=1, save_top_k=-1,
                                        save_on_train_epoch_end=False)  # after validation
    trainer = L.Trainer(
        default_root_dir=root, logger=TensorBoardLogger(root, name="run"), max_epochs=3,
        accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[RNGState(), TemperatureAnnealing(start=1.0, end=0.2),
                   SelectionLogger(every_n_steps=2), step_checkpoints, epoch_checkpoints],
    )
    model = FlexActRegressor(in_features=4, hidden_features=3)
    trainer.fit(model, SyntheticDataModule(n_train=160, n_val=32, batch_size=32),
                ckpt_path=ckpt_path)
    assert trainer.global_step == 15
    return Path(trainer.log_dir or "")


def _history_rows(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "selection_history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The root of an uninterrupted run of :func:`_synthetic_run`."""
    root = tmp_path_factory.mktemp("uninterrupted")
    _synthetic_run(root)
    return root


@pytest.mark.parametrize("checkpoint", [
    "steps/step=3.ckpt",  # mid-epoch, between two records
    "epochs/epoch=0.ckpt",  # epoch boundary (saved after validation)
    "steps/step=9.ckpt",  # mid-epoch, in the second epoch
    "steps/step=15.ckpt",  # the end: nothing left to train
])
def test_resumed_run_history_covers_the_whole_run(synthetic_run: Path, tmp_path: Path,
                                                  checkpoint: str) -> None:
    (full_dir,) = (synthetic_run / "run").iterdir()
    full = _history_rows(full_dir)
    steps = sorted({int(r["step"]) for r in full})
    assert steps == [0, 2, 4, 5, 6, 8, 10, 12, 14, 15]  # every 2 steps and every epoch end
    saved = torch.load(synthetic_run / checkpoint, weights_only=True)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("SelectionLogger")]
    saved_step = int(checkpoint.split("=")[1][:-5]) if "step" in checkpoint else 5
    # The checkpoint holds the history so far, the epoch end's record included.
    assert state["history"]["step"][-1] == max(s for s in steps if s <= saved_step)
    resumed_dir = _synthetic_run(tmp_path, ckpt_path=synthetic_run / checkpoint)
    resumed = _history_rows(resumed_dir)
    assert resumed == full  # same rows, restored ones first
    assert int(resumed[0]["step"]) == 0 < saved_step
    assert (json.loads((resumed_dir / "selection.json").read_text())
            == json.loads((full_dir / "selection.json").read_text()))
    assert read_history(resumed_dir / "selection_history.csv").series == read_history(
        full_dir / "selection_history.csv").series  # the PNGs plot the whole run
    assert sorted(p.name for p in resumed_dir.glob("*.png")) == ["selection_head.flexact.png"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _watching_commands() -> list[list[str]]:
    """The shell commands of the README's "Watching the selection" section, split into words."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Watching the selection", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip()]


def _option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def test_readme_overlay_compares_alpha_on_the_same_truth(tmp_path: Path) -> None:
    """Run the README's overlay example (tiny) and check what it compares."""
    commands = _watching_commands()
    fits = [c for c in commands if c[:2] == ["flexact", "fit"]]
    (plot,) = [c for c in commands if c[:2] == ["flexact", "plot"]]
    assert len(fits) == 2
    # Apart from α and the folder's name, the two runs are the same command: the same truth.
    varying = {"--model.alpha", "--trainer.logger.init_args.version"}
    same = [[w for i, w in enumerate(c) if w not in varying and c[i - 1] not in varying]
            for c in fits]
    assert same[0] == same[1] and _option(fits[0], "--data.truth") is not None
    tiny = ["--data.n_train", "128", "--data.n_val", "32", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(tmp_path / "runs" / "synthetic"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    for fit in fits:
        main([*(str(REPO / w) if w.startswith("configs/") else w for w in fit[1:]), *tiny])
    histories = [plot[2], *(plot[plot.index("--compare") + 1:plot.index("--labels")])]
    labels = plot[plot.index("--labels") + 1:plot.index("--labels") + 1 + len(histories)]
    truths, alphas = set(), []
    for history in histories:
        config = yaml.safe_load((tmp_path / history).with_name("config.yaml").read_text())
        truths.add(config["data"]["init_args"]["truth"])
        alphas.append(config["model"]["init_args"]["alpha"])
    assert len(truths) == 1  # one truth
    assert alphas == [float(label.split("=")[1]) for label in labels] == [0.3, 0.0]
    out = tmp_path / (_option(plot, "--out") or "")
    main(["plot", *(str(tmp_path / w) if w.startswith("runs/") else w for w in plot[2:]),
          "--out", str(out)])
    assert [p.name for p in out.glob("*.png")] == ["selection_head.flexact.png"]


def test_readme_plot_folder_is_not_committed() -> None:
    (plot,) = [c for c in _watching_commands() if c[:2] == ["flexact", "plot"]]
    out = _option(plot, "--out")
    assert out
    try:
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{out}/selection_x.png"],
                                 cwd=REPO, timeout=30, check=False)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, f"{out}/ is not in .gitignore"


@pytest.mark.slow
def test_tensorboard_server_serves_series_layout_and_every_heatmap(run_dir: Path,
                                                                   tmp_path: Path) -> None:
    """TensorBoard, started as the README says, serves the series, the layout and all images."""
    (tensorboard,) = [c for c in _watching_commands() if c[0] == "tensorboard"]
    logdir = tmp_path / "runs"
    shutil.copytree(run_dir, logdir / "version_0")
    many = 12  # more than TensorBoard's default of 10 images per tag
    writer = SummaryWriter(str(logdir / "long"))
    summary = {"flexact": {"candidates": CANDIDATES, "probabilities": [0.2] * 5}}
    for step in range(many):
        add_heatmap(writer, summary, step)
    writer.close()
    args = [str(logdir) if w == _option(tensorboard, "--logdir") else w for w in tensorboard[1:]]
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", *args, "--port", str(port),
         "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        deadline = time.monotonic() + 90
        tags: dict = {}
        while time.monotonic() < deadline:
            try:
                tags = _get_json(f"{base}/scalars/tags")  # type: ignore[assignment]
                images = _get_json(f"{base}/images/tags")
                if tags.get("version_0", {}).get("tau") and "long" in images:  # type: ignore
                    break
            except OSError:
                # exited: e.g. a parallel test worker took the port between pick and bind
                assert server.poll() is None, f"tensorboard exited ({server.returncode})"
            time.sleep(0.5)
        assert "selection/head.flexact/tanh" in tags["version_0"]
        series = _get_json(f"{base}/scalars/scalars?run=version_0&tag=tau")
        assert isinstance(series, list) and len(series) > 20
        layout = _get_json(f"{base}/custom_scalars/layout")
        categories = {c["title"]: c["chart"] for c in layout["category"]}  # type: ignore
        assert list(categories) == ["FlexAct selection: backbone.1",
                                    "FlexAct selection: head.flexact", "FlexAct training"]
        for chart in categories["FlexAct selection: head.flexact"]:
            (pattern,) = chart["multiline"]["tag"]
            query = urllib.parse.urlencode({"run": "version_0", "tag": pattern})
            matched = _get_json(f"{base}/custom_scalars/scalars?{query}")
            assert len(matched["tag_to_events"]) == 1, chart  # type: ignore[index]
        heatmaps: list = []
        while len(heatmaps) < many and time.monotonic() < deadline:  # all of them, in time
            heatmaps = _get_json(  # type: ignore[assignment]
                f"{base}/images/images?run=long&tag=selection/heatmap&sample=0")
            time.sleep(0.2)
        assert sorted(h["step"] for h in heatmaps) == list(range(many))
    finally:
        server.terminate()
        server.wait(timeout=20)
