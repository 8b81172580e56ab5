from __future__ import annotations

import pytest
import torch

from flexact import ConfigError
from flexact.datamodules import SyntheticDataModule, make_synthetic


@pytest.mark.parametrize("truth", ["relu", "sigmoid", "tanh", "leaky_relu", "identity"])
def test_target_is_truth_of_scaled_first_feature(truth: str) -> None:
    x, y = make_synthetic(256, truth, k=5.0, generator=torch.Generator().manual_seed(1))
    expected = {
        "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
        "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.01),
        "identity": lambda t: t,
    }[truth](5.0 * x[:, :1])
    assert x.shape == (256, 4) and y.shape == (256, 1)
    torch.testing.assert_close(y, expected)


def test_splits_are_deterministic_and_sized() -> None:
    dm = SyntheticDataModule(truth="tanh", n_train=100, n_val=30, n_test=20, seed=3, batch_size=16)
    dm.setup("fit")
    again = SyntheticDataModule(truth="tanh", n_train=100, n_val=30, n_test=20, seed=3)
    again.setup("fit")
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [100, 30, 20]
    assert torch.equal(dm.splits["train"].tensors[0], again.splits["train"].tensors[0])
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (16, 4) and yb.shape == (16, 1)
    assert dm.num_features == 4 and dm.num_outputs == 1


def test_noise_and_informative_features() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = make_synthetic(2000, "identity", k=1.0, n_informative=2, noise=0.5, generator=gen)
    residual = y[:, 0] - (x[:, 0] + x[:, 1]) / 2**0.5
    assert 0.45 < residual.std().item() < 0.55


def test_out_of_distribution_split_is_disjoint() -> None:
    dm = SyntheticDataModule(n_train=500, n_val=100, n_test=200, ood_threshold=0.5)
    dm.setup("fit")
    assert dm.splits["train"].tensors[0][:, 0].max() <= 0.5
    assert dm.splits["val"].tensors[0][:, 0].max() <= 0.5
    assert dm.splits["test"].tensors[0][:, 0].min() > 0.5
    assert torch.isfinite(dm.splits["test"].tensors[0]).all()


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match=r"unknown activation 'nope'.*relu"):
        SyntheticDataModule(truth="nope")
    with pytest.raises(ConfigError, match="n_informative"):
        SyntheticDataModule(n_features=2, n_informative=3)
