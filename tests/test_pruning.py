"""Pruned candidates leave the mixture for good, cost nothing, and survive checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from flexact import ConfigError, FlexAct, selection_kl
from flexact.callbacks import RNGState, SelectionCommit
from flexact.datamodules import SyntheticDataModule
from flexact.modules import FlexActRegressor
from flexact.nn.params import unused_selection_parameters
from flexact.tools.profiling import kernel_count


def _layer(prior: list[float], **kwargs: object) -> FlexAct:
    return FlexAct(prior=prior, **kwargs)  # relu sigmoid tanh leaky_relu identity


def test_prune_drops_unlikely_candidates_and_they_never_come_back() -> None:
    layer = _layer([0.5, 0.01, 0.02, 0.3, 0.17])
    assert layer.prune(0.05) == ["sigmoid", "tanh"]
    assert layer.live_names == ("relu", "leaky_relu", "identity")
    probs = layer.probabilities()
    assert probs.shape == (5,) and probs[1] == 0 and probs[2] == 0
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    optimizer = torch.optim.SGD(layer.parameters(), lr=10.0)
    for _ in range(5):  # push hard toward the pruned candidates: tanh-shaped targets
        x = torch.randn(64, 3)
        loss = (layer(x) - torch.tanh(x)).square().mean() + selection_kl(layer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert layer.live_names == ("relu", "leaky_relu", "identity")
    assert layer.probabilities()[[1, 2]].tolist() == [0.0, 0.0]
    assert layer.selected()[0] in layer.live_names


def test_the_most_probable_candidate_always_stays() -> None:
    layer = _layer([0.2, 0.2, 0.2, 0.2, 0.2])
    assert len(layer.prune(0.9)) == 4 and len(layer.live_names) == 1
    with pytest.raises(ConfigError, match="at least one"):
        layer.drop(list(layer.live_names))
    with pytest.raises(ConfigError, match="live candidates"):
        layer.drop(["gelu"])


def test_a_pruned_layer_evaluates_fewer_candidates() -> None:
    x = torch.randn(32, 16, requires_grad=True)
    full = _layer([0.3, 0.01, 0.01, 0.3, 0.38])
    pruned = _layer([0.3, 0.01, 0.01, 0.3, 0.38])
    pruned.prune(0.05)  # sigmoid and tanh gone: no σ(x) or σ(2x) pass is left

    def step(layer: FlexAct) -> None:
        layer(x).sum().backward()

    assert kernel_count(lambda: step(pruned)) < kernel_count(lambda: step(full))
    torch.manual_seed(0)
    out = pruned(x)
    torch.manual_seed(0)
    weights = pruned.sample_weights()
    expected = sum(w * act(x) for w, act in zip(weights, pruned.live_candidates(), strict=True))
    torch.testing.assert_close(out, expected)


def test_per_channel_layers_drop_a_candidate_only_where_no_channel_wants_it() -> None:
    layer = FlexAct(granularity="channel", num_channels=2,
                    candidates=["relu", "tanh", "sigmoid"])
    with torch.no_grad():
        layer.logits.copy_(torch.tensor([[4.0, 0.0, -4.0], [0.0, 4.0, -4.0]]))
    assert layer.prune(0.05) == ["sigmoid"]
    out = layer(torch.randn(8, 2))
    assert out.shape == (8, 2) and layer.live_names == ("relu", "tanh")


def test_the_live_set_is_saved_and_old_states_load_with_every_candidate() -> None:
    layer = _layer([0.5, 0.01, 0.02, 0.3, 0.17])
    layer.prune(0.05)
    state = layer.state_dict()
    fresh = FlexAct()
    fresh.load_state_dict(state)
    assert fresh.live_names == ("relu", "leaky_relu", "identity")
    torch.testing.assert_close(fresh.probabilities(), layer.probabilities())
    old = dict(state, _extra_state={"candidates": list(layer.candidate_names)})
    fresh.load_state_dict(old)  # a state written before pruning existed
    assert fresh.live_names == layer.candidate_names


def test_pruned_candidates_parameters_are_anchored_for_ddp() -> None:
    layer = FlexAct(candidates=["relu", "prelu"], prior=[0.99, 0.01])
    layer.prune(0.05)
    slope = next(iter(layer.candidates[1].parameters()))
    assert any(p is slope for p in unused_selection_parameters(layer))
    assert not unused_selection_parameters(FlexAct(candidates=["relu", "prelu"]))


def _fit(root: Path, commit: SelectionCommit, ckpt_path: Path | None = None,
         extra: list[L.Callback] | None = None) -> FlexActRegressor:
    L.seed_everything(0)
    model = FlexActRegressor(in_features=4, flexact={"prior": [0.4, 0.02, 0.03, 0.35, 0.2]},
                             alpha=0.3, selection_lr_scale=1.0,
                             optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, limit_val_batches=0,
                        callbacks=[commit, RNGState(), *(extra or [])])
    trainer.fit(model, SyntheticDataModule(n_train=160, batch_size=16), ckpt_path=ckpt_path)
    return model


def _pruning() -> SelectionCommit:
    return SelectionCommit(mode="adaptive", at=0.9, threshold=0.99, patience=2,
                           min_fraction=0.1, check_every_n_steps=4, prune_below=0.05)


def test_selection_commit_prunes_and_a_resume_prunes_alike(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    full_commit = _pruning()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}",
                            every_n_train_steps=6, save_top_k=-1)
    full = _fit(tmp_path / "full", full_commit, extra=[saver])
    assert full_commit.pruned == {"head.flexact": ["sigmoid", "tanh"]}
    assert full.model.head.flexact.live_names == ("relu", "leaky_relu", "identity")
    resumed_commit = _pruning()  # step 6: one low check behind it, restored from the state
    resumed = _fit(tmp_path / "resumed", resumed_commit,
                   ckpt_path=tmp_path / "ckpt" / "step=6.ckpt")
    assert resumed_commit.pruned == full_commit.pruned
    assert resumed_commit.committed_steps == full_commit.committed_steps
    for key, value in full.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed.state_dict()[key]), key
