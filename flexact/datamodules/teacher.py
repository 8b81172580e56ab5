"""``TeacherDataModule``: binary labels from a random teacher network (docs/method.md §4).

The simulated data of Farhadi, Partovi Nia & Lodi (2019): a random multilayer perceptron with
1 or 8 hidden layers of 10 units and sigmoid or ReLU activations labels Gaussian inputs.
With ``ood_region`` the validation inputs come from a disjoint shell of the input space (see
:class:`TeacherDataModule`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, PositiveInt
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from flexact.datamodules.base import SplitDataModule
from flexact.datamodules.synthetic import check_ood_region, sample_in_region
from flexact.errors import ConfigError
from flexact.nn.registry import check_activation_name, get_activation

__all__ = [
    "TeacherDataModule",
    "TeacherRule",
    "input_radius",
    "make_teacher",
    "sample_shell",
    "teacher_network",
    "teacher_rule",
]


def teacher_network(
    n_features: int, depth: int, width: int, activation: str, generator: torch.Generator
) -> nn.Sequential:
    """A random MLP ``n_features → width (×depth) → 1`` with Glorot-normal weights."""
    layers: list[nn.Module] = []
    sizes = [n_features] + [width] * depth
    for fan_in, fan_out in itertools.pairwise(sizes):
        linear = nn.Linear(fan_in, fan_out)
        std = (2.0 / (fan_in + fan_out)) ** 0.5
        with torch.no_grad():
            linear.weight.copy_(torch.randn(fan_out, fan_in, generator=generator) * std * 2)
            linear.bias.copy_(torch.randn(fan_out, generator=generator) * 0.5)
        layers += [linear, get_activation(activation)]
    out = nn.Linear(sizes[-1], 1)
    with torch.no_grad():
        out.weight.copy_(torch.randn(1, sizes[-1], generator=generator))
        out.bias.zero_()
    return nn.Sequential(*layers, out)


@dataclass
class TeacherRule:
    """The labelling rule: a teacher network and the centre and scale of its output.

    ``center`` (the median) and ``scale`` (the standard deviation) come from one reference
    sample, so every input, whatever region it was drawn from, is labelled by the same rule.
    """

    teacher: nn.Module
    """The random teacher network."""
    center: float
    """Median of the teacher's output on the reference sample."""
    scale: float
    """Standard deviation of that output (at least 1e-8)."""

    def score(self, x: Tensor) -> Tensor:
        """The centred, scaled teacher output ``(n,)``."""
        with torch.no_grad():
            return (self.teacher(x).squeeze(1) - self.center) / self.scale

    def labels(self, x: Tensor, sample_labels: bool = False,
               generator: torch.Generator | None = None) -> Tensor:
        """Long labels ``(n,)``: the score's sign, or Bernoulli draws of ``sigmoid(4·score)``."""
        score = self.score(x)
        if sample_labels:
            return torch.bernoulli(torch.sigmoid(4 * score), generator=generator).long()
        return (score > 0).long()


def teacher_rule(n: int, depth: int = 1, activation: str = "sigmoid", n_features: int = 10,
                 width: int = 10, seed: int = 0
                 ) -> tuple[TeacherRule, Tensor, torch.Generator]:
    """Build the teacher of ``seed`` and centre it on a reference sample of ``n`` N(0, I) inputs.

    Returns:
        ``(rule, x, generator)``: the rule, the reference inputs ``(n, n_features)`` and the
        generator, advanced past both (label draws continue from it).
    """
    generator = torch.Generator().manual_seed(seed)
    teacher = teacher_network(n_features, depth, width, activation, generator)
    x = torch.randn(n, n_features, generator=generator)
    with torch.no_grad():
        score = teacher(x).squeeze(1)
    rule = TeacherRule(teacher, score.median().item(), score.std().clamp_min(1e-8).item())
    return rule, x, generator


def make_teacher(
    n: int,
    depth: int = 1,
    activation: str = "sigmoid",
    n_features: int = 10,
    width: int = 10,
    sample_labels: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` inputs ``x ~ N(0, I)`` and binary labels from a random teacher.

    The teacher's output is centred on its median, so the classes are balanced; labels are its
    sign, or Bernoulli draws from ``sigmoid(output / std)`` with ``sample_labels``.

    Returns:
        ``(x, y)``: float inputs ``(n, n_features)`` and long labels ``(n,)`` in {0, 1}.
    """
    rule, x, generator = teacher_rule(n, depth, activation, n_features, width, seed)
    return x, rule.labels(x, sample_labels, generator)


def input_radius(x: Tensor) -> Tensor:
    """The RMS of each input vector, ``‖x‖₂/√d``, shaped ``(n,)`` (about 1 for N(0, I))."""
    return torch.linalg.vector_norm(x, dim=1) / x.shape[1] ** 0.5


def _chi2_quantile(u: Tensor, d: int, low: float, high: float, upper: bool) -> Tensor:
    """Invert the χ²(d) CDF (``upper``: its survival function) on ``[low, high]`` by bisection."""
    half = torch.tensor(d / 2, dtype=torch.float64)
    cdf = torch.special.gammaincc if upper else torch.special.gammainc
    lo, hi = torch.full_like(u, low), torch.full_like(u, high)
    for _ in range(80):
        mid = (lo + hi) / 2
        below = (cdf(half, mid / 2) > u) if upper else (cdf(half, mid / 2) < u)
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def _draw_shell(n: int, d: int, region: tuple[float, float],
                generator: torch.Generator) -> Tensor:
    """``n`` draws of N(0, I_d) conditioned on ``low < ‖x‖₂/√d ≤ high``, by scaling directions.

    A uniform direction times a radius whose square follows χ²(d) truncated to
    ``(d·low², d·high²]`` (inverse-CDF sampling; the survival function for shells in the upper
    half, so far tails stay exact) is exactly the conditioned Gaussian.
    """
    t_low, t_high = d * region[0] ** 2, d * region[1] ** 2
    half = torch.tensor(d / 2, dtype=torch.float64)
    upper = bool(torch.special.gammainc(half, torch.tensor(t_low / 2, dtype=half.dtype)) > 0.5)
    cdf = torch.special.gammaincc if upper else torch.special.gammainc
    c_low, c_high = (cdf(half, torch.tensor(t / 2, dtype=torch.float64)) for t in (t_low, t_high))
    u = c_low + torch.rand(n, generator=generator, dtype=torch.float64) * (c_high - c_low)
    t = _chi2_quantile(u, d, t_low, t_high, upper)
    g = torch.randn(n, d, generator=generator, dtype=torch.float64)
    direction = g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-300)
    return (direction * t.sqrt()[:, None]).float()


def sample_shell(n: int, n_features: int, region: tuple[float, float],
                 generator: torch.Generator) -> Tensor:
    """``n`` inputs from N(0, I) conditioned on ``low < input_radius(x) ≤ high``.

    ``low`` = 0 means ``input_radius(x) ≤ high``. Deterministic given the generator's state.
    """
    return sample_in_region(n, lambda size: _draw_shell(size, n_features, region, generator),
                            input_radius, region)


class TeacherDataModule(SplitDataModule):
    """Binary classification data labelled by a random teacher network.

    Args:
        depth: Hidden layers of the teacher (the papers use 1 and 8).
        activation: The teacher's hidden activation (registry name or expression; the papers
            use ``sigmoid`` and ``relu``).
        n_features: Input features.
        width: Units per hidden layer.
        n_samples: Total examples, split into train/val/test.
        val_fraction: Share of examples for validation.
        test_fraction: Share of examples for testing.
        sample_labels: Draw labels from the teacher's probability instead of its sign (adds
            label noise).
        ood_region: If set, ``(a, b)`` with ``0 < a < b``: an out-of-distribution validation
            split, in the input's RMS ``r = ‖x‖₂/√d`` (about 1 for N(0, I)). The split sizes
            stay those of ``n_samples`` and the fractions; train and test inputs are fresh
            N(0, I) draws conditioned on ``r ≤ a`` (test: held-out in-distribution), validation
            inputs on ``a < r ≤ b``. Every split is labelled by the same teacher rule: its
            output is centred and scaled on the reference sample of ``n_samples`` plain
            N(0, I) inputs (the data without ``ood_region``), never on a region, so an input
            gets the same label whichever split it lands in.
        seed: Seed of the teacher, the inputs and the split.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.

    The training order of epoch ``e`` is a pure function of the run's seed and ``e``, and the
    training loader resumes mid-epoch (see :class:`~flexact.datamodules.base.SplitDataModule`).
    """

    def __init__(
        self,
        depth: PositiveInt = 1,
        activation: str = "sigmoid",
        n_features: PositiveInt = 10,
        width: PositiveInt = 10,
        n_samples: PositiveInt = 10000,
        val_fraction: ClosedUnitInterval = 0.1,
        test_fraction: ClosedUnitInterval = 0.2,
        sample_labels: bool = False,
        ood_region: tuple[float, float] | None = None,
        seed: int = 0,
        batch_size: PositiveInt = 128,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_activation_name(activation)
        if val_fraction + test_fraction >= 1:
            raise ConfigError(f"val_fraction + test_fraction must be < 1, got "
                              f"{val_fraction} + {test_fraction}")
        self.ood_region = check_ood_region(ood_region)
        self.save_hyperparameters()
        self.num_features = int(n_features)
        self.num_outputs = 2

    def setup(self, stage: str | None = None) -> None:
        """Build the teacher and split its data once, deterministically from ``seed``."""
        if self.splits:
            return
        hp = self.hparams
        rule, x, generator = teacher_rule(hp.n_samples, hp.depth, hp.activation, hp.n_features,
                                          hp.width, hp.seed)
        n_val = int(hp.n_samples * hp.val_fraction)
        n_test = int(hp.n_samples * hp.test_fraction)
        n_train = hp.n_samples - n_val - n_test
        if self.ood_region is not None:
            a, b = self.ood_region
            shells = torch.Generator().manual_seed(hp.seed + 2)
            for split, n, region in (("train", n_train, (0.0, a)), ("val", n_val, (a, b)),
                                     ("test", n_test, (0.0, a))):
                xs = sample_shell(n, hp.n_features, region, shells)
                self.splits[split] = TensorDataset(xs, rule.labels(xs, hp.sample_labels, shells))
            return
        y = rule.labels(x, hp.sample_labels, generator)
        order = torch.randperm(hp.n_samples, generator=torch.Generator().manual_seed(hp.seed + 1))
        parts = torch.split(order, [n_train, n_val, n_test])
        for split, index in zip(("train", "val", "test"), parts, strict=True):
            self.splits[split] = TensorDataset(x[index], y[index])
