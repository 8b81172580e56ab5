"""``SplitDataModule``: named splits served by loaders that resume exactly.

The loader code every flexact data module shares: the subclass builds its splits in ``setup``,
this class serves them. The training order of epoch ``e`` is a pure function of the run's seed
and ``e`` (:class:`~flexact.datamodules.sampling.EpochRandomSampler`), the training loader
resumes in the middle of an epoch (:class:`~flexact.datamodules.sampling.ResumableDataLoader`),
and no loader draws from the global random generator, so a resumed run sees exactly the batches
of the uninterrupted one and evaluation never shifts the random stream of training.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from flexact.datamodules.sampling import EpochRandomSampler, ResumableDataLoader, run_seed

__all__ = ["SplitDataModule"]


class SplitDataModule(L.LightningDataModule):
    """A data module serving the map-style data sets in :attr:`splits` through resumable loaders.

    Subclasses fill ``self.splits`` with ``"train"``, ``"val"`` and ``"test"`` in ``setup``;
    prediction serves the test split. The training loader shuffles with an
    :class:`~flexact.datamodules.sampling.EpochRandomSampler` seeded with the run's seed (which
    Lightning replaces under DDP by a ``DistributedSampler`` following the same rule) and is a
    :class:`~flexact.datamodules.sampling.ResumableDataLoader`; evaluation loaders keep the
    order. Every loader has a ``torch.Generator`` of its own (seeded with ``seed``), so starting
    one never draws from the global generator.

    Args:
        batch_size: Samples per batch (per device under DDP).
        num_workers: DataLoader worker processes (0: load in the main process).
        seed: Seed of the loaders' generators; also of the shuffling when the run has no seed
            of its own (``seed_everything``).
    """

    def __init__(self, batch_size: int, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.splits: dict[str, Dataset] = {}
        """The data set of each split, once :meth:`setup` has run (a subclass that keeps
        something else there, as the image modules keep ``(images, labels)`` pairs, overrides
        ``_dataset``)."""

    def _dataset(self, split: str) -> Dataset:
        if split not in self.splits:
            raise RuntimeError(f"{type(self).__name__}.setup() has not prepared the {split} split")
        return self.splits[split]

    def _pin_memory(self) -> bool:
        """Whether the loaders pin host memory (subclasses whose batches are large say yes)."""
        return False

    def _loader(self, split: str, train: bool) -> Iterable[Any]:
        """The loader of one split: shuffled and resumable for training, in order otherwise."""
        dataset = self._dataset(split)
        # A generator of its own keeps the loader off the global RNG (each iterator draws a
        # base seed), so evaluation never shifts the Gumbel noise of training.
        generator = torch.Generator().manual_seed(self.seed)
        options: dict[str, Any] = {
            "batch_size": self.batch_size, "num_workers": self.num_workers,
            "generator": generator, "persistent_workers": self.num_workers > 0,
            "pin_memory": self._pin_memory(),
        }
        if train:
            sampler = EpochRandomSampler(dataset, seed=run_seed(self.seed))  # type: ignore[arg-type]
            return ResumableDataLoader(dataset, sampler=sampler, **options)
        return DataLoader(dataset, **options)

    def train_dataloader(self) -> Iterable[Any]:
        """Shuffled, resumable batches of the training split."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> Iterable[Any]:
        """Batches of the validation split, in order."""
        return self._loader("val", train=False)

    def test_dataloader(self) -> Iterable[Any]:
        """Batches of the test split, in order."""
        return self._loader("test", train=False)

    def predict_dataloader(self) -> Iterable[Any]:
        """Batches of the test split, in order."""
        return self._loader("test", train=False)
