"""``TeacherDataModule``: binary labels from a random teacher network (docs/method.md §4).

The simulated data of Farhadi, Partovi Nia & Lodi (2019): a random multilayer perceptron with
1 or 8 hidden layers of 10 units and sigmoid or ReLU activations labels Gaussian inputs.
"""

from __future__ import annotations

import itertools

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, PositiveInt
from torch import nn
from torch.utils.data import TensorDataset

from flexact.datamodules.base import SplitDataModule
from flexact.errors import ConfigError
from flexact.nn.registry import check_activation_name, get_activation

__all__ = ["TeacherDataModule", "make_teacher", "teacher_network"]


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
    generator = torch.Generator().manual_seed(seed)
    teacher = teacher_network(n_features, depth, width, activation, generator)
    x = torch.randn(n, n_features, generator=generator)
    with torch.no_grad():
        score = teacher(x).squeeze(1)
    score = (score - score.median()) / score.std().clamp_min(1e-8)
    if sample_labels:
        y = torch.bernoulli(torch.sigmoid(4 * score), generator=generator).long()
    else:
        y = (score > 0).long()
    return x, y


class TeacherDataModule(SplitDataModule):
    """Binary classification data labelled by a random teacher network.

    Args:
        depth: Hidden layers of the teacher (the papers use 1 and 8).
        activation: The teacher's hidden activation (registry name; ``sigmoid`` or ``relu``).
        n_features: Input features.
        width: Units per hidden layer.
        n_samples: Total examples, split into train/val/test.
        val_fraction: Share of examples for validation.
        test_fraction: Share of examples for testing.
        sample_labels: Draw labels from the teacher's probability instead of its sign (adds
            label noise).
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
        seed: int = 0,
        batch_size: PositiveInt = 128,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_activation_name(activation)
        if val_fraction + test_fraction >= 1:
            raise ConfigError(f"val_fraction + test_fraction must be < 1, got "
                              f"{val_fraction} + {test_fraction}")
        self.save_hyperparameters()
        self.num_features = int(n_features)
        self.num_outputs = 2

    def setup(self, stage: str | None = None) -> None:
        """Build the teacher and split its data once, deterministically from ``seed``."""
        if self.splits:
            return
        hp = self.hparams
        x, y = make_teacher(hp.n_samples, hp.depth, hp.activation, hp.n_features, hp.width,
                            hp.sample_labels, hp.seed)
        n_val = int(hp.n_samples * hp.val_fraction)
        n_test = int(hp.n_samples * hp.test_fraction)
        n_train = hp.n_samples - n_val - n_test
        order = torch.randperm(hp.n_samples, generator=torch.Generator().manual_seed(hp.seed + 1))
        parts = torch.split(order, [n_train, n_val, n_test])
        for split, index in zip(("train", "val", "test"), parts, strict=True):
            self.splits[split] = TensorDataset(x[index], y[index])
