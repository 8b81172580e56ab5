"""``SyntheticDataModule``: the paper's synthetic recovery task (docs/method.md §3.1)."""

from __future__ import annotations

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch.utils.data import TensorDataset

from flexact.datamodules.base import SplitDataModule
from flexact.errors import ConfigError
from flexact.nn.registry import check_activation_name, get_activation

__all__ = ["SyntheticDataModule", "make_synthetic"]


def make_synthetic(
    n: int,
    truth: str = "relu",
    k: float = 5.0,
    n_features: int = 4,
    n_informative: int = 1,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    informative_range: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` samples of ``y = a(k·z)`` with ``x ~ N(0, I)`` and ``z`` the informative signal.

    ``z`` is ``x₁`` for one informative feature, else the normalized sum
    ``(x₁ + … + x_m)/√m``, so it stays standard normal.

    Args:
        n: Number of samples.
        truth: Registry name of the hidden activation ``a``.
        k: Scale of the pre-activation.
        n_features: Number of input features.
        n_informative: Number of leading features that enter ``z``.
        noise: Standard deviation of Gaussian noise added to ``y``.
        generator: Random generator (for reproducibility).
        informative_range: If set, ``x₁`` is drawn from N(0, 1) truncated to this interval
            (for out-of-distribution splits); the other features stay N(0, 1).

    Returns:
        ``(x, y)`` with shapes ``(n, n_features)`` and ``(n, 1)``.
    """
    activation = get_activation(truth)
    x = torch.randn(n, n_features, generator=generator)
    if informative_range is not None:
        low, high = (torch.special.ndtr(torch.tensor(v, dtype=torch.float64))
                     for v in informative_range)
        u = torch.rand(n, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        x[:, 0] = torch.special.ndtri(low + u * (high - low)).clamp(*informative_range).float()
    z = x[:, :n_informative].sum(dim=1, keepdim=True) / n_informative**0.5
    with torch.no_grad():
        y = activation(k * z)
        if noise > 0:
            y = y + noise * torch.randn(y.shape, generator=generator)
    return x, y


class SyntheticDataModule(SplitDataModule):
    """Regression data ``y = a(k·x₁)`` with a hidden ground-truth activation ``a``.

    Args:
        truth: Registry name of the hidden activation (the paper uses relu, sigmoid, tanh,
            leaky_relu and identity).
        k: Scale of the pre-activation (the paper's k = 5).
        n_features: Number of input features, all N(0, 1).
        n_informative: Number of leading features that enter the target (1 in the paper).
        n_train: Training samples.
        n_val: Validation samples.
        n_test: Test samples.
        noise: Standard deviation of Gaussian label noise.
        ood_threshold: If set, an extrapolation split: train and validation inputs have
            ``x₁ ≤ ood_threshold``, test inputs ``x₁ > ood_threshold``.
        seed: Seed of the data generator (independent of the training seed).
        batch_size: Samples per batch (per device under DDP).
        num_workers: DataLoader worker processes (0: load in the main process).

    The training order of epoch ``e`` is a pure function of the run's seed and ``e`` (see
    :mod:`flexact.datamodules.sampling`), and the training loader resumes mid-epoch, so a run
    resumed from any checkpoint sees exactly the batches of the uninterrupted run. Under DDP,
    Lightning shards every split with a ``DistributedSampler`` that follows the same rule.
    """

    def __init__(
        self,
        truth: str = "relu",
        k: PositiveFloat = 5.0,
        n_features: PositiveInt = 4,
        n_informative: PositiveInt = 1,
        n_train: PositiveInt = 4096,
        n_val: PositiveInt = 1024,
        n_test: PositiveInt = 1024,
        noise: NonNegativeFloat = 0.0,
        ood_threshold: float | None = None,
        seed: int = 0,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_activation_name(truth)
        if n_informative > n_features:
            raise ConfigError(f"n_informative ({n_informative}) cannot exceed n_features "
                              f"({n_features})")
        self.save_hyperparameters()
        self.num_features = int(n_features)
        self.num_outputs = 1

    def setup(self, stage: str | None = None) -> None:
        """Generate all splits once, deterministically from ``seed``."""
        if self.splits:
            return
        hp = self.hparams
        generator = torch.Generator().manual_seed(hp.seed)
        t = hp.ood_threshold
        inf = float("inf")
        ranges = {"train": None, "val": None, "test": None}
        if t is not None:
            ranges = {"train": (-inf, t), "val": (-inf, t), "test": (t, inf)}
        for split, n in (("train", hp.n_train), ("val", hp.n_val), ("test", hp.n_test)):
            x, y = make_synthetic(n, hp.truth, hp.k, hp.n_features, hp.n_informative, hp.noise,
                                  generator, ranges[split])
            self.splits[split] = TensorDataset(x, y)
