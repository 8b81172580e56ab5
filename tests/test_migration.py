"""A checkpoint written by flexact 0.1 (flat FlexAct arguments, no ``module.model``) still works.

The fixture ``fixtures/flexact_0_1.ckpt`` was written by ``flexact fit --config
fixtures/flexact_0_1.yaml`` on the flexact 0.1 main: an MLP backbone with ``activation:
flexact`` (candidates relu, tanh) and a FlexAct head over relu, tanh, identity, τ = 0.7, λ = 0.3.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexact.cli import build_cli
from flexact.cli.export import export_checkpoint
from flexact.modules import FlexActRegressor
from flexact.modules.hparams import migrate_hparams, migrate_state_dict

LEGACY = Path(__file__).parent / "fixtures" / "flexact_0_1.ckpt"


def _legacy() -> dict:
    return torch.load(LEGACY, weights_only=True)


def test_the_fixture_is_in_the_old_format() -> None:
    checkpoint = _legacy()
    assert "candidates" in checkpoint["hyper_parameters"]
    assert "flexact" not in checkpoint["hyper_parameters"]
    assert "head.flexact.logits" in checkpoint["state_dict"]


def test_migration_moves_flat_settings_and_prefixes_keys() -> None:
    checkpoint = _legacy()
    hparams, state = dict(checkpoint["hyper_parameters"]), dict(checkpoint["state_dict"])
    assert migrate_hparams(hparams) and migrate_state_dict(state)
    assert hparams["flexact"]["candidates"] == ["relu", "tanh", "identity"]
    assert hparams["flexact"]["kl_lambda"] == pytest.approx(0.3)
    assert not any(key in hparams for key in ("candidates", "tau", "kl_lambda"))
    assert all(key.startswith("model.") for key in state)
    assert not migrate_hparams(hparams) and not migrate_state_dict(state)  # idempotent


def test_load_from_checkpoint_restores_the_old_model() -> None:
    saved = _legacy()["state_dict"]
    module = FlexActRegressor.load_from_checkpoint(LEGACY)
    head = module.model.head.flexact
    assert head.candidate_names == ("relu", "tanh", "identity")
    assert head.kl_lambda == pytest.approx(0.3)
    torch.testing.assert_close(head.logits, saved["head.flexact.logits"])
    site = module.model.backbone.layers[2]
    assert site.candidate_names == ("relu", "tanh")
    torch.testing.assert_close(site.logits, saved["backbone.layers.2.logits"])
    torch.testing.assert_close(module.model.head.linear.weight, saved["head.linear.weight"])


def test_the_cli_resumes_an_old_checkpoint(tmp_path: Path) -> None:
    before = _legacy()["global_step"]
    # The configured candidates must match the checkpoint's (test_failures covers a mismatch).
    cli = build_cli(["fit", "--model", "FlexActRegressor", "--data", "SyntheticDataModule",
                     "--model.flexact.candidates", "[relu,tanh,identity]",
                     "--data.n_train", "64", "--data.batch_size", "32",
                     "--trainer.max_epochs", "2", "--trainer.logger", "false",
                     "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(tmp_path),
                     "--ckpt_path", str(LEGACY)])
    assert cli.trainer.global_step == before + 2
    assert cli.model.model.head.flexact.candidate_names == ("relu", "tanh", "identity")


def test_an_old_checkpoint_exports(tmp_path: Path) -> None:
    script, _ = export_checkpoint(LEGACY, tmp_path / "model.pt")
    model = torch.jit.load(str(script))
    module = FlexActRegressor.load_from_checkpoint(LEGACY).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), module(x))
