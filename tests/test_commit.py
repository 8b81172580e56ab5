"""SelectionCommit's adaptive mode: each layer commits once settled, identically after a resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from flexact import ConfigError, freeze_selection
from flexact.callbacks import RNGState, SelectionCommit, SelectionLogger
from flexact.datamodules import SyntheticDataModule
from flexact.modules import FlexActRegressor

# The head starts settled (a strong prior on relu); the backbone site starts uniform.
SETTLED = {"prior": [0.97, 0.01, 0.01, 0.005, 0.005]}


def _module() -> FlexActRegressor:
    backbone = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    return FlexActRegressor(backbone=backbone, hidden_features=3, flexact=SETTLED,
                            swap_backbone=True, backbone_flexact={},
                            # each layer on its own, from the first step: per-layer commits
                            share_selection=False, selection_warmup=0.0, selection_lr_scale=10.0,
                            optimizer=lambda p: torch.optim.Adam(p, lr=0.01))


def _adaptive(reset_optimizer: bool = False) -> SelectionCommit:
    return SelectionCommit(mode="adaptive", at=0.9, threshold=0.9, patience=2,
                           min_fraction=0.1, check_every_n_steps=4,
                           reset_optimizer=reset_optimizer)


def optimizer_steps(trainer: L.Trainer) -> set[int]:
    """The weights' step counts in Adam's state (each parameter counts its own steps; a
    committed layer's logits stop counting at its commit)."""
    optimizer = trainer.optimizers[0]
    return {int(optimizer.state[p]["step"]) for p in optimizer.param_groups[0]["params"]}


def _fit(root: Path, commit: SelectionCommit, ckpt_path: Path | None = None,
         extra: list[L.Callback] | None = None) -> tuple[L.Trainer, FlexActRegressor]:
    L.seed_everything(0)
    model = _module()
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, limit_val_batches=0,
                        callbacks=[commit, RNGState(), *(extra or [])])
    trainer.fit(model, SyntheticDataModule(n_train=160, batch_size=16), ckpt_path=ckpt_path)
    return trainer, model


def test_each_layer_commits_when_settled_and_the_rest_at_the_latest(tmp_path: Path) -> None:
    commit = _adaptive()
    checks: list[int] = []
    original = commit._settled_layers

    def spy(open_layers: list[Any]) -> list[str]:
        checks.append(trainer_ref[0].global_step)
        return original(open_layers)

    trainer_ref: list[L.Trainer] = []

    class Ref(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer_ref.append(trainer)

    commit._settled_layers = spy  # type: ignore[method-assign]
    trainer, model = _fit(tmp_path, commit, extra=[Ref()])
    total = trainer.estimated_stepping_batches  # 40
    assert set(commit.committed_steps) == {"backbone.1", "head.flexact"}
    head, site = commit.committed_steps["head.flexact"], commit.committed_steps["backbone.1"]
    # The settled head: at its second check after min_fraction (step 4 is the first ≥ 4).
    assert head == 8 and head < 0.9 * total
    assert site == 36  # never settled: committed at `at` (0.9 × 40)
    assert checks and all(step % 4 == 0 and step >= 0.1 * total for step in checks)
    assert model.model.head.flexact.committed and model.model.backbone[1].committed
    assert commit.committed and commit.committed_at == 36


def test_steps_that_decide_nothing_do_not_walk_the_model(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from flexact.callbacks import commit as commit_module

    walks: list[int] = []
    original = commit_module.named_layers
    trainer_ref: list[L.Trainer] = []

    def counting(model: nn.Module) -> list[Any]:
        walks.append(trainer_ref[0].global_step if trainer_ref else -1)
        return original(model)

    class Ref(L.Callback):
        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            trainer_ref.append(trainer)

    monkeypatch.setattr(commit_module, "named_layers", counting)
    commit = _adaptive()
    trainer, _ = _fit(tmp_path, commit, extra=[Ref()])
    # Train start (step 0), then only adaptive checks (every 4 steps from 4) until the last
    # layer commits at 36: no walk after it, none between checks.
    assert walks[0] == 0 and walks[-1] == 36
    assert all(step % 4 == 0 for step in walks) and len(walks) <= 1 + 36 // 4 + 1
    assert trainer.global_step == 40 and commit.committed


class OptimizerSteps(L.Callback):
    """Test-only: Adam's step count per parameter name before the step ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.steps = at, {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at:
            state = trainer.optimizers[0].state
            self.steps = {n: int(state[p]["step"]) if p in state else None
                          for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("reset_optimizer", [False, True])
def test_a_commit_can_restart_the_optimizer_state(tmp_path: Path, reset_optimizer: bool) -> None:
    commit, snapshot = _adaptive(reset_optimizer), OptimizerSteps(at=12)
    trainer, _ = _fit(tmp_path, commit, extra=[snapshot])
    assert commit.committed_steps == {"head.flexact": 8, "backbone.1": 36}
    # Cleared at each commit (the last at step 36): Adam's steps count from there.
    assert optimizer_steps(trainer) == ({40 - 36} if reset_optimizer else {40})
    # Between the commits (step 12): the weights count from the head's commit at 8, the head's
    # logits have no state left, and the open backbone layer's logits kept theirs.
    steps = snapshot.steps
    assert steps["model.head.linear.weight"] == (12 - 8 if reset_optimizer else 12)
    assert steps["model.head.flexact.logits"] == (None if reset_optimizer else 8)
    assert steps["model.backbone.1.logits"] == 12


def test_optimizers_that_cannot_restart_are_refused_at_train_start() -> None:
    from types import SimpleNamespace

    from flexact.callbacks._optimizer_state import check_clearable

    adam = torch.optim.Adam([nn.Parameter(torch.zeros(1))])
    check_clearable("SelectionCommit", [adam])  # torch's own optimizers restart
    commit = SelectionCommit(reset_optimizer=True)
    with pytest.raises(ConfigError, match="has none: set reset_optimizer: false"):
        commit.on_train_start(SimpleNamespace(optimizers=[object()]), _module())  # type: ignore[arg-type]
    adam.param_groups[0]["step"] = 10  # apex's and DeepSpeed's fused Adam count steps here
    with pytest.raises(ConfigError, match="counts its steps in its parameter groups"):
        commit.on_train_start(SimpleNamespace(optimizers=[adam]), _module())  # type: ignore[arg-type]


@pytest.mark.parametrize(("resume_step", "reset_optimizer"),
                         [(6, False), (6, True), (12, False), (12, True)])
def test_a_resumed_run_commits_at_the_same_steps(tmp_path: Path, resume_step: int,
                                                 reset_optimizer: bool) -> None:
    full_commit = _adaptive(reset_optimizer)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}",
                            every_n_train_steps=6, save_top_k=-1)
    _, full = _fit(tmp_path / "full", full_commit, extra=[saver])
    # Step 6: the head has one check behind it (streak 1) and commits at step 8 only if the
    # streak is restored. Step 12: after the head's commit, whose fresh optimizer state the
    # checkpoint must carry.
    resumed_commit = _adaptive(reset_optimizer)
    _, resumed = _fit(tmp_path / "resumed", resumed_commit, ckpt_path=tmp_path / "ckpt" /
                      f"step={resume_step}.ckpt")
    assert resumed_commit.committed_steps == full_commit.committed_steps
    # The checkpoint carries the state as it was: counted from the head's commit at 8 if cleared.
    saved = torch.load(tmp_path / "ckpt" / f"step={resume_step}.ckpt", weights_only=False)
    optimizer = saved["optimizer_states"][0]
    assert {int(optimizer["state"][i]["step"]) for i in optimizer["param_groups"][0]["params"]} \
        == {resume_step - 8 if reset_optimizer and resume_step > 8 else resume_step}
    for key, value in full.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed.state_dict()[key]), key


def test_commit_steps_reach_selection_json(tmp_path: Path) -> None:
    commit = _adaptive()
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run")
    L.seed_everything(0)
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=logger,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[commit, SelectionLogger(plots=False)])
    trainer.fit(_module(), SyntheticDataModule(n_train=160, batch_size=16))
    selection = json.loads((Path(trainer.log_dir) / "selection.json").read_text())
    assert {k: v["committed_at"] for k, v in selection.items()} == commit.committed_steps


def test_a_committed_model_is_the_frozen_model(tmp_path: Path) -> None:
    _, model = _fit(tmp_path, _adaptive())
    frozen = freeze_selection(model.model).eval()
    x = torch.randn(9, 4)
    model.train()  # committed layers apply exactly their pick in training too
    with torch.no_grad():
        torch.testing.assert_close(model.model(x), frozen(x))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "sometimes"}, "mode"),
    ({"threshold": 1.5}, "threshold"),
    ({"patience": 0}, "patience"),
    ({"min_fraction": 0.8, "at": 0.5}, "min_fraction"),
    ({"check_every_n_steps": 0}, "check_every_n_steps"),
    ({"reset_optimizer": "yes"}, "reset_optimizer must be true or false"),
])
def test_bad_adaptive_arguments_are_clear_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SelectionCommit(**kwargs)


class RecordCommits(L.Callback):
    """Test-only: each rank writes its commit steps, picks, final logits and the checks' verdicts
    to ``<path>/<rank>``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        commit = next(c for c in trainer.callbacks if isinstance(c, SelectionCommit))
        layers = dict(pl_module.model.named_modules())
        record = {"steps": commit.committed_steps, "step": trainer.global_step,
                  "picks": {n: layers[n].selected() for n in commit.committed_steps},
                  "logits": {n: layers[n].logits.tolist() for n in commit.committed_steps},
                  "verdicts": commit.verdicts,
                  "optimizer_steps": sorted(optimizer_steps(trainer))}
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"{trainer.global_rank}.json").write_text(json.dumps(record))


def fit_two_ranks(tmp_path: Path, commit: dict[str, Any], model: dict[str, Any],
                  *overrides: str) -> list[dict[str, Any]]:
    """``flexact fit`` of configs/synthetic.yaml on two gloo ranks, with ``SelectionCommit(
    **commit)``, the model's init_args ``model`` and :class:`RecordCommits`; each rank's record.
    """
    import yaml

    from .conftest import REPO
    from .test_distributed import run_bounded

    config = tmp_path / "ddp_commit.yaml"
    config.write_text(yaml.safe_dump({
        "extends": str(REPO / "configs" / "synthetic.yaml"),
        "trainer": {"callbacks": [
            {"class_path": "SelectionCommit", "init_args": commit},
            {"class_path": "tests.test_commit.RecordCommits",
             "init_args": {"path": str(tmp_path / "records")}}]},
        "model": {"init_args": model}}))
    out = run_bounded([sys.executable, "-m", "flexact", "fit", "--config", str(config),
                       "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                       "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp_path),
                       "--trainer.logger", "false", *overrides], timeout=180)
    assert out.returncode == 0, out.stdout[-4000:]
    return [json.loads((tmp_path / "records" / f"{r}.json").read_text()) for r in (0, 1)]


def test_two_gloo_ranks_commit_at_the_same_steps(tmp_path: Path) -> None:
    """Adaptive commits under DDP: both ranks decide from identical logits, at identical steps."""
    commit = {"mode": "adaptive", "at": 0.9, "threshold": 0.9, "patience": 2,
              "min_fraction": 0.1, "check_every_n_steps": 4, "prune_below": 0.02,
              "reset_optimizer": True}
    model = {"backbone": {"class_path": "flexact.backbones.MLP",
                          "init_args": {"in_features": 4, "hidden": [6]}},
             "hidden_features": 3, "swap_backbone": True,
             "share_selection": False,  # each layer on its own, from the first step
             "selection_warmup": 0.0, "backbone_flexact": {}, "flexact": SETTLED}
    ranks = fit_two_ranks(tmp_path, commit, model, "--trainer.max_epochs", "4",
                          "--data.n_train", "160", "--data.n_val", "32", "--data.batch_size", "8")
    assert ranks[0] == ranks[1]
    steps, total = ranks[0]["steps"], ranks[0]["step"]  # 160 / 2 ranks / 8 = 10 steps an epoch
    assert total == 40 and set(steps) == {"backbone.layers.2", "head.flexact"}
    assert steps["head.flexact"] < 0.9 * total  # settled early: an adaptive commit
    assert ranks[0]["picks"]["head.flexact"] == ["relu"]
    assert ranks[0]["optimizer_steps"] == [total - max(steps.values())]  # reset at the last
