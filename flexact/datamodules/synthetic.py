"""``SyntheticDataModule``: the paper's synthetic recovery task (docs/method.md §3.1)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor
from torch.utils.data import TensorDataset

from flexact.datamodules.base import SplitDataModule
from flexact.errors import ConfigError
from flexact.nn.registry import check_activation_name, get_activation

__all__ = [
    "SyntheticDataModule",
    "check_ood_region",
    "informative_signal",
    "make_synthetic",
    "region_mask",
    "sample_in_region",
]


def check_ood_region(region: Sequence[float] | None,
                     ood_threshold: float | None = None) -> tuple[float, float] | None:
    """Validate an ``ood_region`` argument: ``None`` or ``(a, b)`` with ``0 < a < b`` finite.

    Raises:
        ConfigError: If the region is malformed, or combined with ``ood_threshold``.
    """
    if region is None:
        return None
    hint = ("; e.g. ood_region: [1.0, 3.0] trains and tests on |r| <= 1 and validates on "
            "1 < |r| <= 3")
    if isinstance(region, (str, bytes)) or not isinstance(region, Sequence) or len(region) != 2 \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in region):
        raise ConfigError(f"ood_region must be a pair of numbers (a, b), got {region!r}{hint}")
    a, b = float(region[0]), float(region[1])
    if not (math.isfinite(a) and math.isfinite(b) and 0 < a < b):
        raise ConfigError(f"ood_region (a, b) needs finite 0 < a < b, got ({region[0]}, "
                          f"{region[1]}){hint}")
    if ood_threshold is not None:
        raise ConfigError("ood_threshold and ood_region are two different out-of-distribution "
                          "splits; set only one of them (the other null)")
    return a, b


def region_mask(r: Tensor, low: float, high: float) -> Tensor:
    """Which radii lie in ``(low, high]`` (``[0, high]`` when ``low`` is 0), compared in float64."""
    r = r.double()
    return ((r > low) | (low <= 0)) & (r >= 0) & (r <= high)


def sample_in_region(n: int, draw: Callable[[int], Tensor], radius: Callable[[Tensor], Tensor],
                     region: tuple[float, float]) -> Tensor:
    """Draw ``n`` rows with ``draw`` and redraw the rows whose ``radius`` left ``region``.

    ``draw`` samples (nearly) inside the region already; the redraws only catch the rare row
    that float32 rounding pushed across a boundary, so every returned row is inside.

    Raises:
        ConfigError: If the region is too thin for float32 to hold the samples.
    """
    x = draw(n)
    for _ in range(100):
        bad = ~region_mask(radius(x), *region)
        if not bad.any():
            return x
        x[bad] = draw(int(bad.sum()))
    raise ConfigError(f"could not draw inputs with {region[0]} < r <= {region[1]}: the region "
                      "is too thin for float32 inputs; widen ood_region")


def informative_signal(x: Tensor, n_informative: int) -> Tensor:
    """The signal ``z``: ``x₁``, or ``(x₁ + … + x_m)/√m``, shaped ``(n, 1)``."""
    return x[:, :n_informative].sum(dim=1, keepdim=True) / n_informative**0.5


def _draw_informative(n: int, n_informative: int, region: tuple[float, float],
                      generator: torch.Generator | None) -> Tensor:
    """Informative features ``(n, m)`` distributed as N(0, I) given ``|z|`` in ``region``.

    ``|z|`` is drawn from the standard normal truncated to the region by inverting its upper
    tail (exact far out), given a random sign, and spread over the ``m`` features as ``z/√m``
    along ``(1, …, 1)`` plus N(0, I) noise orthogonal to it: the conditional law of ``x``.
    """
    low, high = (torch.tensor(-v, dtype=torch.float64) for v in region)
    u_low, u_high = torch.special.ndtr(low), torch.special.ndtr(high)  # tail mass beyond |z|
    u = u_high + torch.rand(n, generator=generator, dtype=torch.float64) * (u_low - u_high)
    magnitude = (-torch.special.ndtri(u)).clamp(*region)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    w = torch.randn(n, n_informative, generator=generator, dtype=torch.float64)
    x = w - w.mean(dim=1, keepdim=True) + (sign * magnitude / n_informative**0.5)[:, None]
    return x.float()


def make_synthetic(
    n: int,
    truth: str = "relu",
    k: float = 5.0,
    n_features: int = 4,
    n_informative: int = 1,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    informative_range: tuple[float, float] | None = None,
    signal_region: tuple[float, float] | None = None,
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
        signal_region: If set, ``(low, high)``: the inputs are N(0, I) conditioned on
            ``low < |z| ≤ high`` (``|z| ≤ high`` when ``low`` is 0), exactly, for every
            ``n_informative`` (see :func:`informative_signal`).

    Returns:
        ``(x, y)`` with shapes ``(n, n_features)`` and ``(n, 1)``.
    """
    activation = get_activation(truth)
    if informative_range is not None and signal_region is not None:
        raise ConfigError("make_synthetic takes informative_range or signal_region, not both")
    x = torch.randn(n, n_features, generator=generator)
    if signal_region is not None:
        m, region = n_informative, signal_region
        x[:, :m] = sample_in_region(n, lambda size: _draw_informative(size, m, region, generator),
                                    lambda v: informative_signal(v, m)[:, 0].abs(), region)
    if informative_range is not None:
        low, high = (torch.special.ndtr(torch.tensor(v, dtype=torch.float64))
                     for v in informative_range)
        u = torch.rand(n, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        x[:, 0] = torch.special.ndtri(low + u * (high - low)).clamp(*informative_range).float()
    z = informative_signal(x, n_informative)
    with torch.no_grad():
        y = activation(k * z)
        if noise > 0:
            y = y + noise * torch.randn(y.shape, generator=generator)
    return x, y


class SyntheticDataModule(SplitDataModule):
    """Regression data ``y = a(k·z)`` with a hidden ground-truth activation ``a``.

    ``z`` is the informative signal: ``x₁``, or ``(x₁ + … + x_m)/√m`` for ``m`` informative
    features (standard normal either way).

    Args:
        truth: Registry name or expression of the hidden activation (the paper uses relu,
            sigmoid, tanh, leaky_relu and identity; e.g. ``add(sin(x),mul(0.5,x))`` works too).
        k: Scale of the pre-activation (the paper's k = 5).
        n_features: Number of input features, all N(0, 1).
        n_informative: Number of leading features that enter the target (1 in the paper).
        n_train: Training samples.
        n_val: Validation samples.
        n_test: Test samples.
        noise: Standard deviation of Gaussian label noise.
        ood_threshold: If set, an extrapolation split: train and validation inputs have
            ``x₁ ≤ ood_threshold``, test inputs ``x₁ > ood_threshold``.
        ood_region: If set, ``(a, b)`` with ``0 < a < b``: an out-of-distribution validation
            split for searches whose fitness is performance on a disjoint input region. Train
            and test inputs have ``|z| ≤ a`` (test: held-out in-distribution), validation
            inputs ``a < |z| ≤ b``; each is N(0, I) conditioned on its region, sizes stay
            ``n_train``/``n_val``/``n_test``. Not together with ``ood_threshold``.
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
        ood_region: tuple[float, float] | None = None,
        seed: int = 0,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_activation_name(truth)
        if n_informative > n_features:
            raise ConfigError(f"n_informative ({n_informative}) cannot exceed n_features "
                              f"({n_features})")
        self.ood_region = check_ood_region(ood_region, ood_threshold)
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
        ranges: dict[str, tuple[float, float] | None] = {"train": None, "val": None, "test": None}
        regions = dict(ranges)
        if t is not None:
            ranges = {"train": (-inf, t), "val": (-inf, t), "test": (t, inf)}
        if self.ood_region is not None:
            a, b = self.ood_region
            regions = {"train": (0.0, a), "val": (a, b), "test": (0.0, a)}
        for split, n in (("train", hp.n_train), ("val", hp.n_val), ("test", hp.n_test)):
            x, y = make_synthetic(n, hp.truth, hp.k, hp.n_features, hp.n_informative, hp.noise,
                                  generator, ranges[split], regions[split])
            self.splits[split] = TensorDataset(x, y)
