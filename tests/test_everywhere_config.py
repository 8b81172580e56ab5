"""configs/lenet5_mnist_everywhere.yaml: one selection for the network, committed and checked."""

from __future__ import annotations

import json
from pathlib import Path

from flexact.callbacks import SelectionCommit
from flexact.cli import build_cli
from flexact.modules.selection import EVERYWHERE
from flexact.nn import FlexAct
from flexact.tools.fake_data import write_mnist

from .conftest import REPO
from .test_cli import QUIET


def test_the_everywhere_config_commits_one_checked_pick(tmp_path: Path) -> None:
    """The sweep benchmark's everywhere recipe, run through the config on tiny MNIST files.

    The run is too short for an adaptive check (every 350 steps), so its layers commit at the
    latest moment; the recipe's settings are asserted as parsed, its effects as run.
    """
    data = tmp_path / "data"
    write_mnist(data, n_train_per_class=4, n_test_per_class=1, compress=True)
    cli = build_cli(["fit", "--config", str(REPO / "configs" / "lenet5_mnist_everywhere.yaml"),
                     *QUIET, "--data.data_dir", str(data), "--data.download", "false",
                     "--data.batch_size", "8", "--trainer.max_epochs", "3",
                     "--trainer.default_root_dir", str(tmp_path)])
    # The recipe: shared logits, the 30 % warm-up, ×100 → ×3000 (the everywhere defaults) ...
    assert cli.model.selection == EVERYWHERE
    (commit,) = [c for c in cli.trainer.callbacks if isinstance(c, SelectionCommit)]
    assert (commit.mode, commit.prune_below, commit.verify, commit.reset_optimizer) == (
        "adaptive", 0.02, True, True)
    # ... and what it did: FlexAct at all three sites, one selection, each layer committed
    # after the warm-up with its pick checked.
    layers = [m for m in cli.model.modules() if isinstance(m, FlexAct)]
    assert len(layers) == 3 and len({id(layer.logits) for layer in layers}) == 1
    assert all(layer.committed for layer in layers)
    (path,) = tmp_path.rglob("selection.json")
    selection = json.loads(path.read_text())
    assert len(selection) == 3 and len({v["pick"] for v in selection.values()}) == 1
    for entry in selection.values():
        assert entry["commit_check"]["chosen"] == entry["pick"]
        assert entry["commit_check"]["samples"] == 8
        assert entry["committed_at"] >= EVERYWHERE.warmup * cli.trainer.global_step
    # The optimizer's state restarted at the commit: every weight's Adam step counts from it.
    (step,) = {v["committed_at"] for v in selection.values()}
    counts = {int(s["step"]) for s in cli.trainer.optimizers[0].state.values()}
    assert counts == {cli.trainer.global_step - step}
