"""SelectionCommit(verify=True): each pick is checked by the loss of every live candidate."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from flexact import ConfigError
from flexact.callbacks import RNGState, SelectionCommit, SelectionLogger
from flexact.callbacks._verify import verify_pick
from flexact.datamodules import SyntheticDataModule
from flexact.modules import FlexActRegressor
from flexact.nn import FlexAct
from flexact.nn.trial import applying

# The head starts settled on leaky_relu, the twin of the data's relu.
ON_LEAKY = {"prior": [0.005, 0.005, 0.005, 0.98, 0.005]}


def _regressor(flexact: dict[str, object] | None = None) -> FlexActRegressor:
    return FlexActRegressor(in_features=4, hidden_features=None, flexact=flexact or ON_LEAKY,
                            selection_lr_scale=1.0, selection_lr_scale_end=1.0,
                            optimizer=lambda p: torch.optim.Adam(p, lr=0.05))


def _fitted() -> FlexActRegressor:
    """A head whose affine map is exactly the data's: z = 5·x₁."""
    model = _regressor()
    with torch.no_grad():
        linear = model.model.head.linear
        linear.weight.zero_()
        linear.weight[0, 0] = 5.0
        linear.bias.zero_()
    return model


def _batch(truth: str, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    data = SyntheticDataModule(truth=truth, n_train=n, n_val=8, n_test=8, batch_size=n)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_applying_one_candidate_is_exact_and_restores_the_layer() -> None:
    layer = FlexAct(["relu", "tanh", "identity"], prior=[0.1, 0.8, 0.1])
    x = torch.randn(5, 3)
    logits = layer.logits.detach().clone()
    with applying([layer], "identity"):
        torch.testing.assert_close(layer(x), x)  # exactly identity, train mode included
    assert not layer.committed and layer.committed_index is None
    assert torch.equal(layer.logits, logits) and layer.selected() == ["tanh"]
    with pytest.raises(ConfigError, match="'sigmoid' alone"):
        with applying([layer], "sigmoid"):
            pass
    assert not layer.committed


@pytest.mark.parametrize(("truth", "chosen"), [("relu", "relu"), ("leaky_relu", "leaky_relu")])
def test_the_check_tells_twins_apart(truth: str, chosen: str) -> None:
    model = _fitted()
    layer = model.model.head.flexact
    verdict = verify_pick(model, [layer], _batch(truth), z_min=3.0)
    assert verdict.pick == "leaky_relu" and verdict.chosen == chosen
    assert set(verdict.errors) == set(layer.candidate_names) and verdict.samples == 64
    if truth == "relu":  # relu is exact on the data; leaky_relu errs on every negative sample
        assert verdict.errors["relu"] < 1e-10 < verdict.errors["leaky_relu"]
        assert verdict.z["relu"] >= 3.0
    assert model.training  # the check ran in eval mode and put the mode back


def test_the_check_leaves_a_near_tie_alone() -> None:
    model = _fitted()
    x = _batch("relu")[0]
    x[:, 0] = x[:, 0].abs()  # only positive inputs: relu, leaky_relu and identity coincide
    verdict = verify_pick(model, [model.model.head.flexact], (x, 5.0 * x[:, 0]), z_min=3.0)
    assert verdict.chosen == "leaky_relu"
    assert verdict.z["relu"] == verdict.z["identity"] == 0.0


def _fit(root: Path, verify: bool, ckpt_path: Path | None = None,
         extra: list[L.Callback] | None = None,
         logger: L.pytorch.loggers.Logger | bool = False) -> tuple[SelectionCommit,
                                                                   FlexActRegressor]:
    """160 steps on relu data; the head starts on leaky_relu and settles there by step 84."""
    L.seed_everything(0)
    model = _regressor()
    commit = SelectionCommit(mode="adaptive", at=0.9, threshold=0.9, patience=2,
                             min_fraction=0.5, check_every_n_steps=4, verify=verify)
    trainer = L.Trainer(max_epochs=16, accelerator="cpu", logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, limit_val_batches=0,
                        callbacks=[commit, RNGState(), *(extra or [])])
    trainer.fit(model, SyntheticDataModule(truth="relu", n_train=640, batch_size=64),
                ckpt_path=ckpt_path)
    return commit, model


def test_a_verified_commit_picks_the_twin_the_logits_missed(tmp_path: Path) -> None:
    plain, model = _fit(tmp_path / "plain", verify=False)
    assert model.model.head.flexact.selected() == ["leaky_relu"]  # the logits alone
    assert plain.verdicts == {}
    commit, model = _fit(tmp_path / "verified", verify=True)
    layer = model.model.head.flexact
    assert layer.selected() == ["relu"] and layer.committed
    assert layer.live_names == ("relu",)
    assert sorted(commit.pruned["head.flexact"]) == ["identity", "leaky_relu", "sigmoid", "tanh"]
    verdict = commit.verdicts["head.flexact"]
    assert verdict["pick"] == "leaky_relu" and verdict["chosen"] == "relu"
    assert commit.committed_steps["head.flexact"] < 0.9 * 160  # settled: an adaptive commit


def test_a_resumed_verified_run_commits_alike(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=60,
                            save_top_k=-1)
    full_commit, full = _fit(tmp_path / "full", verify=True, extra=[saver])
    # Step 60: before the commit (at 84), mid-streak; step 120: after it, so the resumed run
    # restores the checked pick instead of deciding again.
    for step in (60, 120):
        commit, resumed = _fit(tmp_path / f"resumed{step}", verify=True,
                               ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt")
        assert commit.committed_steps == full_commit.committed_steps
        assert commit.verdicts == full_commit.verdicts
        assert resumed.model.head.flexact.selected() == ["relu"]
        for key, value in full.state_dict().items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, resumed.state_dict()[key]), (step, key)


def test_the_verdict_reaches_selection_json(tmp_path: Path) -> None:
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="run")
    commit, _ = _fit(tmp_path, verify=True, extra=[SelectionLogger(plots=False)], logger=logger)
    selection = json.loads((Path(logger.log_dir) / "selection.json").read_text())
    assert selection["head.flexact"]["commit_check"] == commit.verdicts["head.flexact"]
    assert selection["head.flexact"]["commit_check"]["chosen"] == "relu"


def test_verify_needs_a_per_sample_loss_and_a_positive_t() -> None:
    class Bare(L.LightningModule):
        pass

    with pytest.raises(ConfigError, match="verify_z"):
        SelectionCommit(verify=True, verify_z=0)
    with pytest.raises(ConfigError, match="verify must be true or false"):
        SelectionCommit(verify="yes")  # type: ignore[arg-type]
    from flexact.callbacks._verify import check_verifiable
    with pytest.raises(ConfigError, match="criterion"):
        check_verifiable(Bare())


def test_two_gloo_ranks_reach_one_verdict(tmp_path: Path) -> None:
    """Each rank checks its own batch; the counts are summed, so both switch alike."""
    from .test_commit import fit_two_ranks

    commit = {"mode": "adaptive", "at": 0.9, "threshold": 0.9, "patience": 2,
              "min_fraction": 0.5, "check_every_n_steps": 4, "verify": True}
    model = {"flexact": ON_LEAKY, "selection_lr_scale": 1.0, "selection_lr_scale_end": 1.0}
    ranks = fit_two_ranks(tmp_path, commit, model, "--trainer.max_epochs", "16",
                          "--data.truth", "relu", "--data.n_train", "640", "--data.n_val", "32",
                          "--data.batch_size", "32")
    assert ranks[0] == ranks[1]
    verdict = ranks[0]["verdicts"]["head.flexact"]
    assert verdict["pick"] == "leaky_relu" and verdict["chosen"] == "relu"
    assert ranks[0]["picks"]["head.flexact"] == ["relu"]
    assert verdict["samples"] == 64  # both ranks' batches of 32 counted


def test_a_classifier_compares_errors_not_the_cross_entropy() -> None:
    """Identity in place of Sigmoid sharpens every softmax: a lower loss, no fewer errors."""
    from flexact.modules import FlexActClassifier

    model = FlexActClassifier(in_features=2, num_classes=2, hidden_features=2,
                              flexact={"prior": [0.005, 0.98, 0.005, 0.005, 0.005]})
    head = model.model.head
    with torch.no_grad():  # logit difference 4·(a(x₁) − a(x₂)): the sign is the same for all
        head.linear.weight.copy_(torch.eye(2))
        head.linear.bias.zero_()
        head.output.weight.copy_(torch.tensor([[2.0, -2.0], [-2.0, 2.0]]))
        head.output.bias.zero_()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * 3
    y = (x[:, 0] < x[:, 1]).long()  # every sample right with sigmoid, identity alike
    verdict = verify_pick(model, [head.flexact], (x, y), z_min=3.0)
    assert verdict.pick == verdict.chosen == "sigmoid"
    assert verdict.errors["sigmoid"] == verdict.errors["identity"] == 0.0
    model.sample_errors = None  # the cross-entropy instead: identity would take the pick
    assert verify_pick(model, [head.flexact], (x, y), z_min=3.0).chosen == "identity"


def test_layers_sharing_one_selection_are_checked_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flexact.backbones import MLP
    from flexact.callbacks import _verify as verify_module

    groups: list[list[FlexAct]] = []
    original = verify_module.verify_pick

    def spy(pl_module: L.LightningModule, layers: list[FlexAct], *args: object) -> object:
        groups.append(list(layers))
        return original(pl_module, layers, *args)

    monkeypatch.setattr(verify_module, "verify_pick", spy)
    L.seed_everything(0)
    model = FlexActRegressor(backbone=MLP(4, hidden=[6, 6]), hidden_features=3,
                             swap_backbone=True, share_selection=True, selection_warmup=0.0,
                             optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    commit = SelectionCommit(at=0.5, verify=True)  # fixed mode: every layer at half-way
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, callbacks=[commit])
    trainer.fit(model, SyntheticDataModule(n_train=320, batch_size=32))
    layers = [layer for layer in model.modules() if isinstance(layer, FlexAct)]
    assert len(layers) == 3 and len(groups) == 1 and len(groups[0]) == 3  # one joint check
    assert len({json.dumps(v, sort_keys=True) for v in commit.verdicts.values()}) == 1
    assert len(commit.verdicts) == 3 and len({tuple(layer.selected()) for layer in layers}) == 1
    assert all(layer.committed for layer in layers)


def test_a_run_resumed_past_at_checks_at_its_first_step(tmp_path: Path) -> None:
    """The checkpoint of step 80 precedes the commit at `at` = 0.5: the resumed run must check."""
    def fit(root: Path, ckpt: Path | None, extra: list[L.Callback]) -> SelectionCommit:
        L.seed_everything(0)
        commit = SelectionCommit(at=0.5, verify=True)
        trainer = L.Trainer(max_epochs=16, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=root, limit_val_batches=0,
                            callbacks=[commit, RNGState(), *extra])
        trainer.fit(_regressor(), SyntheticDataModule(truth="relu", n_train=640, batch_size=64),
                    ckpt_path=ckpt)
        return commit

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=80,
                            save_top_k=-1)
    full = fit(tmp_path / "full", None, [saver])
    assert full.verdicts["head.flexact"]["chosen"] == "relu"
    resumed = fit(tmp_path / "resumed", tmp_path / "ckpt" / "step=80.ckpt", [])
    assert resumed.verdicts == full.verdicts
    assert resumed.committed_steps == full.committed_steps == {"head.flexact": 80}
