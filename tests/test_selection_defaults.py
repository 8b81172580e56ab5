"""How selection logits learn: head-only and everywhere defaults, warm-up, old checkpoints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from flexact import ConfigError
from flexact.datamodules import SyntheticDataModule
from flexact.modules import FlexActRegressor
from flexact.modules.hparams import migrate_hparams
from flexact.modules.selection import (
    EVERYWHERE,
    HEAD_ONLY,
    REGULARIZED_LR_SCALE_END,
    STANDARDIZED_HEAD_LR_SCALE,
)
from flexact.nn import flexact_layers


def _module(**kwargs: object) -> FlexActRegressor:
    backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    return FlexActRegressor(backbone=backbone, hidden_features=4,
                            optimizer=lambda p: torch.optim.Adam(p, lr=0.01), **kwargs)


def _logits(module: FlexActRegressor) -> list[nn.Parameter]:
    return [layer.logits for _, layer in flexact_layers(module.model)]


def _raw(**kwargs: object) -> FlexActRegressor:
    """A head-only module whose head takes the raw selection gradient (the ×5 start)."""
    return _module(flexact={"selection_gradient": "raw"}, **kwargs)


def test_head_only_and_everywhere_get_their_own_defaults() -> None:
    head = _raw()
    assert head.selection == HEAD_ONLY
    assert (HEAD_ONLY.lr_scale, HEAD_ONLY.lr_scale_end, HEAD_ONLY.share, HEAD_ONLY.warmup) == (
        5.0, 3000.0, False, 0.0)
    # A head with an output map compares standardized candidates (auto) and starts at 1×.
    standardized = _module()
    assert standardized.model.head.flexact.selection_gradient == "standardized"
    assert standardized.selection == replace(HEAD_ONLY, lr_scale=STANDARDIZED_HEAD_LR_SCALE)
    assert STANDARDIZED_HEAD_LR_SCALE == 1.0
    assert standardized.hparams["selection_lr_scale"] == 1.0  # saved: a resume keeps it
    assert _module(flexact={"selection_gradient": "standardized"}).selection.lr_scale == 1.0
    assert _module(swap_backbone=True,  # everywhere: its own default, whatever the gradient
                   flexact={"selection_gradient": "standardized"}).selection.lr_scale == 100.0
    everywhere = _module(swap_backbone=True)
    assert everywhere.selection == EVERYWHERE
    assert (EVERYWHERE.lr_scale, EVERYWHERE.lr_scale_end, EVERYWHERE.share,
            EVERYWHERE.warmup) == (100.0, 3000.0, True, 0.3)
    logits = _logits(everywhere)
    assert len(logits) == 3 and all(p is logits[0] for p in logits)  # one selection
    # The values used are the saved hyper-parameters (a checkpoint rebuilds the same module).
    assert {k: everywhere.hparams[k] for k in ("selection_lr_scale", "share_selection",
                                               "selection_warmup", "selection_lr_scale_end")
            } == EVERYWHERE.as_hparams()
    groups = everywhere.configure_optimizers().param_groups
    assert [g["lr"] for g in groups if any(p is logits[0] for p in g["params"])] == [
        pytest.approx(1.0)]  # 100 × 0.01
    # Given values win over the mode's defaults.
    mine = _module(swap_backbone=True, share_selection=False, selection_warmup=0.0,
                   selection_lr_scale=5.0)
    assert (mine.selection.lr_scale, mine.selection.share, mine.selection.warmup) == (
        5.0, False, 0.0)
    assert len({id(p) for p in _logits(mine)}) == 3
    # A rate asked for stays constant, unless its end is asked for too.
    assert _module(selection_lr_scale=10.0).selection.lr_scale_end == 10.0
    assert _raw(selection_lr_scale_end=50.0).selection.lr_scale == HEAD_ONLY.lr_scale
    assert _module(selection_lr_scale=3.0).selection.lr_scale == 3.0


def test_with_a_kl_term_the_rate_ends_lower_unless_told() -> None:
    # α > 0: the regularizer's steady pull must not get 3000× steps once the task's fades.
    assert REGULARIZED_LR_SCALE_END == {False: 300.0, True: 100.0}
    assert _raw(alpha=0.3).selection == replace(HEAD_ONLY, lr_scale_end=300.0)
    assert _module(alpha=0.3).selection.lr_scale_end == 300.0  # the standardized start too
    assert _module(alpha=0.3).selection.lr_scale == STANDARDIZED_HEAD_LR_SCALE
    everywhere = _module(swap_backbone=True, alpha=0.3)
    assert everywhere.selection == replace(EVERYWHERE, lr_scale_end=100.0)  # constant 100×
    assert everywhere.hparams["selection_lr_scale_end"] == 100.0  # saved: a resume keeps it
    assert _raw(alpha=0.3, selection_lr_scale_end=3000.0).selection.lr_scale_end == 3000.0
    assert _raw(alpha=0.3, selection_lr_scale=1.0).selection.lr_scale_end == 1.0  # the paper
    assert _raw(alpha=0.0).selection.lr_scale_end == 3000.0


def test_everywhere_shares_only_where_the_layers_can() -> None:
    # The backbone's sites select among other candidates than the head's: nothing to share.
    mixed = _module(swap_backbone=True, backbone_flexact={"candidates": ["relu", "tanh"]})
    assert not mixed.selection.share and len({id(p) for p in _logits(mixed)}) == 3
    with pytest.raises(ConfigError, match="same candidates"):
        _module(swap_backbone=True, backbone_flexact={"candidates": ["relu", "tanh"]},
                share_selection=True)


@pytest.mark.parametrize("warmup", [1.0, 1.5, -0.1])
def test_a_warmup_outside_zero_one_is_refused(warmup: float) -> None:
    with pytest.raises(ConfigError, match=r"selection_warmup must be in \[0, 1\)"):
        _module(selection_warmup=warmup)


class _Record(L.Callback):
    """The shared logits and the first weight after every optimizer step."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object
                           ) -> None:
        self.logits.append(_logits(pl_module)[0].detach().clone())  # type: ignore[arg-type]
        self.weights.append(next(pl_module.parameters()).detach().clone())


def test_the_logits_stay_fixed_during_the_warmup_and_learn_after(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = _module(swap_backbone=True, selection_warmup=0.5)
    start = _logits(module)[0].detach().clone()
    record = _Record()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path, callbacks=[record])
    trainer.fit(module, SyntheticDataModule(n_train=160, batch_size=16))  # 20 steps
    assert len(record.logits) == 20
    frozen, learning = record.logits[:10], record.logits[10:]
    assert all(torch.equal(x, start) for x in frozen)  # untouched for the first 50 %
    assert not torch.equal(learning[0], frozen[-1])  # the first step after the warm-up moves
    # The weights train from the first step on.
    assert not torch.equal(record.weights[0], record.weights[1])


def test_a_warmup_needs_a_run_of_finite_length(tmp_path: Path) -> None:
    module = _module(swap_backbone=True)
    trainer = L.Trainer(max_epochs=-1, max_steps=-1, max_time="00:00:00:20", accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"selection_warmup cannot tell the run's length.*"
                       r"set trainer.max_steps, or selection_warmup: 0"):
        trainer.fit(module, SyntheticDataModule(n_train=32, batch_size=16))


def test_a_commit_before_the_warmup_ends_is_refused(tmp_path: Path) -> None:
    from flexact.callbacks import SelectionCommit

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[SelectionCommit(at=0.3)])
    with pytest.raises(ConfigError, match=r"held fixed until 0\.3"):
        trainer.fit(_module(swap_backbone=True), SyntheticDataModule(n_train=32, batch_size=16))


def test_old_checkpoints_keep_the_selection_they_were_trained_with() -> None:
    # Written before the everywhere defaults: per-layer selection from the first step.
    old = {"swap_backbone": True, "selection_lr_scale": 10.0, "flexact": {}}
    assert migrate_hparams(old)
    assert old["share_selection"] is False and old["selection_warmup"] == 0.0
    assert old["selection_lr_scale"] == 10.0  # saved: kept
    assert old["selection_lr_scale_end"] == 10.0  # before the rate could grow: constant
    assert old["flexact"] == {"selection_gradient": "raw"}  # before "auto" was the default
    older = {"swap_backbone": False}  # before selection_lr_scale existed: trained at 1×
    assert migrate_hparams(older) and older["selection_lr_scale"] == 1.0
    assert older["selection_lr_scale_end"] == 1.0
    assert not migrate_hparams(old)  # once migrated, nothing more to do
    module = _module(**{k: v for k, v in old.items() if k != "flexact"})
    assert not module.selection.share and module.selection.warmup == 0.0
    assert module.selection.lr_factor(7, 10) == 1.0  # constant
    newer = {"swap_backbone": False, "selection_lr_scale": 5.0, "share_selection": False,
             "selection_warmup": 0.0, "selection_lr_scale_end": 300.0}
    assert not migrate_hparams(newer) and newer["selection_lr_scale_end"] == 300.0
    rebuilt = _module(**newer)  # saved before the 3000× end: it keeps its own
    assert rebuilt.selection.lr_scale_end == 300.0 and rebuilt.selection.lr_scale == 5.0
    everywhere = _module(swap_backbone=True, selection_lr_scale=100.0, share_selection=True,
                         selection_warmup=0.3, selection_lr_scale_end=100.0)
    assert everywhere.selection.lr_factor(9, 10) == 1.0  # the constant 100× it trained with
    newest = {**newer, "flexact": {"selection_gradient": "auto"}}
    assert not migrate_hparams(newest) and newest["flexact"]["selection_gradient"] == "auto"
    flat = {"swap_backbone": False, "candidates": ["relu", "tanh"]}  # flexact 0.1's flat form
    assert migrate_hparams(flat)
    assert flat["flexact"] == {"candidates": ["relu", "tanh"], "selection_gradient": "raw"}
    # Hyper-parameters of something else than a FlexActModule are left alone.
    other = {"lr": 0.1}
    assert not migrate_hparams(other) and other == {"lr": 0.1}


@pytest.mark.parametrize(("settings", "at"), [
    ({"swap_backbone": True, "selection_warmup": 0.5}, 6),  # inside the warm-up (steps 0–9)
    ({}, 7),  # the head's default: midway through its growing rate
], ids=["inside-warmup", "mid-ramp"])
def test_a_resumed_run_ends_as_the_uninterrupted_one(tmp_path: Path, settings: dict[str, object],
                                                     at: int) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from flexact.callbacks import RNGState

    def fit(root: Path, extra: list[L.Callback], ckpt: Path | None = None) -> FlexActRegressor:
        L.seed_everything(0)
        module = _module(**settings)
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=root,
                            callbacks=[RNGState(), *extra])
        trainer.fit(module, SyntheticDataModule(n_train=160, batch_size=16), ckpt_path=ckpt)
        return module

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}",
                            every_n_train_steps=at, save_top_k=-1)
    full = fit(tmp_path / "full", [saver])
    resumed = fit(tmp_path / "resumed", [], tmp_path / "ckpt" / f"step={at}.ckpt")
    tensors = {k: v for k, v in full.state_dict().items() if isinstance(v, torch.Tensor)}
    assert any(k.endswith("logits") for k in tensors)
    for key, value in tensors.items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_runs_of_unknown_length_are_refused() -> None:
    from types import SimpleNamespace

    from flexact.callbacks.progress import run_length

    # Lightning: inf for endless runs, -1 for a data set without a length and no max_steps.
    for total in (float("inf"), -1):
        with pytest.raises(ConfigError, match="cannot tell the run's length"):
            run_length(SimpleNamespace(estimated_stepping_batches=total), "step", None,
                       "selection_warmup")
    assert run_length(SimpleNamespace(estimated_stepping_batches=40), "step", None, "x") == 40


def test_a_checkpoint_with_per_layer_logits_does_not_load_into_shared_ones() -> None:
    per_layer = _module(swap_backbone=True, share_selection=False)
    for i, logits in enumerate(_logits(per_layer)):
        with torch.no_grad():
            logits.add_(float(i))  # the layers picked differently
    checkpoint = {"state_dict": per_layer.state_dict()}
    shared = _module(swap_backbone=True)
    with pytest.raises(ConfigError, match="one selection per FlexAct layer"):
        shared.on_load_checkpoint(checkpoint)
    per_layer.on_load_checkpoint(checkpoint)  # the module it came from reads it
    tied = _module(swap_backbone=True)
    tied.on_load_checkpoint({"state_dict": tied.state_dict()})  # shared logits: equal


def test_commit_at_zero_is_fine_without_a_warmup() -> None:
    from flexact.callbacks import SelectionCommit

    SelectionCommit(at=0.0, min_fraction=0.0).check_warmup(_module())
    with pytest.raises(ConfigError, match="held fixed"):
        SelectionCommit(at=0.0, min_fraction=0.0).check_warmup(_module(swap_backbone=True))


def test_no_adaptive_commit_or_pruning_while_the_logits_are_held(tmp_path: Path) -> None:
    from flexact.callbacks import SelectionCommit

    L.seed_everything(0)
    # A prior that looks settled (top 0.97) and a candidate far below the pruning threshold.
    module = _module(swap_backbone=True, selection_warmup=0.5,
                     flexact={"prior": [0.97, 0.01, 0.01, 0.005, 0.005]})
    commit = SelectionCommit(mode="adaptive", at=0.9, threshold=0.9, patience=1,
                             min_fraction=0.1, check_every_n_steps=2, prune_below=0.02)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[commit])
    trainer.fit(module, SyntheticDataModule(n_train=160, batch_size=16))  # 20 steps
    steps = set(commit.committed_steps.values())
    assert steps and min(steps) > 10  # not before the warm-up's end at step 10


class _SelectionRates(L.Callback):
    """The selection logits' and the weights' learning rates at every optimizer step."""

    def __init__(self) -> None:
        self.logits: list[float] = []
        self.weights: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        logits = {id(p) for p in _logits(pl_module)}  # type: ignore[arg-type]
        for group in optimizer.param_groups:
            rates = self.logits if any(id(p) in logits for p in group["params"]) else self.weights
            rates.append(group["lr"])


def _fit_rates(tmp_path: Path, module: FlexActRegressor, scheduler: bool = False
               ) -> tuple[_SelectionRates, L.Trainer]:
    L.seed_everything(0)
    rates = _SelectionRates()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path, callbacks=[rates])
    trainer.fit(module, SyntheticDataModule(n_train=160, batch_size=16))  # 20 steps
    return rates, trainer


def test_the_head_selection_rate_grows_geometrically_and_steps_only_see_it(
        tmp_path: Path) -> None:
    rates, trainer = _fit_rates(tmp_path, _raw())
    assert len(rates.logits) == 20 and rates.weights == [0.01] * 20  # the weights: untouched
    expected = [0.01 * 5.0 * 600.0 ** (step / 20) for step in range(20)]  # 5× → 3000× at the end
    assert rates.logits == pytest.approx(expected)
    # Between steps the group holds its constant-scale rate: what schedulers and checkpoints see.
    groups = trainer.optimizers[0].param_groups
    assert sorted(g["lr"] for g in groups) == pytest.approx([0.01, 0.05])


def test_a_given_rate_is_constant_and_a_ramp_starts_after_the_warmup(tmp_path: Path) -> None:
    constant, _ = _fit_rates(tmp_path, _module(selection_lr_scale=10.0))
    assert constant.logits == pytest.approx([0.1] * 20)
    ramp, _ = _fit_rates(tmp_path, _module(swap_backbone=True, selection_warmup=0.5,
                                           selection_lr_scale_end=400.0))
    # Logits held for steps 0–9 (the optimizer skips them, the group's rate is still set).
    assert ramp.logits[:11] == pytest.approx([1.0] * 11)  # 100 × 0.01 until the warm-up ends
    assert ramp.logits[19] == pytest.approx(1.0 * 4.0 ** 0.9)  # step 19: 9/10 of the way to 4×


def test_a_scheduler_scales_the_ramped_rate_without_compounding_it(tmp_path: Path) -> None:
    def module() -> FlexActRegressor:
        return FlexActRegressor(in_features=4, hidden_features=None,
                                optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
                                lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(
                                    o, step_size=1, gamma=0.5))
    rates, trainer = _fit_rates(tmp_path, module())
    # Epoch 2 runs at half the rate, with the same ramp factor as the step in an unscheduled run.
    assert rates.weights == pytest.approx([0.01] * 10 + [0.005] * 10)
    assert rates.logits == pytest.approx(
        [0.05 * 600.0 ** (s / 20) * (0.5 if s >= 10 else 1.0) for s in range(20)])
    assert sorted(g["lr"] for g in trainer.optimizers[0].param_groups) == pytest.approx(
        [0.0025, 0.0125])  # two epoch ends: 0.25 × the constant-scale rates


class _Batches(L.Callback):
    def __init__(self) -> None:
        self.started = 0

    def on_train_batch_start(self, *args: object) -> None:
        self.started += 1


def test_a_growing_rate_needs_a_run_of_finite_length_before_any_step(tmp_path: Path) -> None:
    batches = _Batches()
    # max_time ends the run should nothing raise; the length stays unknown to the estimate.
    trainer = L.Trainer(max_epochs=-1, max_steps=-1, max_time="00:00:00:20", accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[batches])
    with pytest.raises(ConfigError, match=r"selection_lr_scale_end cannot tell the run's length"
                       r".*set trainer.max_steps, or selection_lr_scale_end equal to"):
        trainer.fit(_module(), SyntheticDataModule(n_train=32, batch_size=16))
    assert batches.started == 0
    constant = L.Trainer(max_epochs=-1, max_steps=-1, max_time="00:00:00:02", accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    constant.fit(_module(selection_lr_scale=5.0), SyntheticDataModule(n_train=32, batch_size=16))
    assert constant.global_step > 0  # a constant rate needs no length


def test_a_checkpoint_written_inside_a_step_holds_the_constant_scale_rate(
        tmp_path: Path) -> None:
    class SaveMidStep(L.Callback):  # as a requeue signal's handler may, at any point of a step
        def on_before_optimizer_step(self, trainer: L.Trainer, *args: object) -> None:
            if trainer.global_step == 10:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    rates = _SelectionRates()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[rates, SaveMidStep()])
    trainer.fit(_raw(), SyntheticDataModule(n_train=160, batch_size=16))
    assert rates.logits[10] == pytest.approx(0.05 * 600.0 ** 0.5)  # the step ran ramped
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=True)["optimizer_states"][0]
    assert sorted(g["lr"] for g in saved["param_groups"]) == pytest.approx([0.01, 0.05])
