"""configs/lenet5_mnist_everywhere.yaml: one selection for the network, committed and checked."""

from __future__ import annotations

import json
from pathlib import Path

from flexact.cli import build_cli
from flexact.nn import FlexAct
from flexact.tools.fake_data import write_mnist

from .conftest import REPO
from .test_cli import QUIET


def test_the_everywhere_config_commits_one_checked_pick(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_mnist(data, n_train_per_class=4, n_test_per_class=1, compress=True)
    cli = build_cli(["fit", "--config", str(REPO / "configs" / "lenet5_mnist_everywhere.yaml"),
                     *QUIET, "--data.data_dir", str(data), "--data.download", "false",
                     "--data.batch_size", "8", "--trainer.max_epochs", "3",
                     "--trainer.default_root_dir", str(tmp_path)])
    layers = [m for m in cli.model.modules() if isinstance(m, FlexAct)]
    assert len(layers) == 3  # both convolutions' activations and the FC layer's
    assert all(layer.committed for layer in layers)
    assert len({id(layer.logits) for layer in layers}) == 1  # one selection for the network
    (path,) = tmp_path.rglob("selection.json")
    selection = json.loads(path.read_text())
    assert len(selection) == 3 and len({v["pick"] for v in selection.values()}) == 1
    for entry in selection.values():  # every layer committed, and its pick was checked
        assert entry["commit_check"]["chosen"] == entry["pick"]
        assert entry["committed_at"] >= 0.3 * cli.trainer.global_step  # after the warm-up
