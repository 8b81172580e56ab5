"""``TensorBatchLoader``: batches drawn by indexing tensors in place, e.g. on the accelerator.

The image data modules serve a data set that lives on the accelerator with it (``on_device``)
instead of a ``DataLoader``, so no host work is left in the training loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor

from flexact.datamodules.sampling import EpochShardSampler, resume_skip

__all__ = ["TensorBatchLoader"]


class TensorBatchLoader:
    """Batches drawn by indexing tensors in place (on the accelerator), without a DataLoader.

    The order of epoch ``e`` is a pure function of ``(seed, e)``, identical on every rank, and
    each rank takes its shard of it exactly as a ``DistributedSampler`` would (padded by
    repetition to equal length), so all ranks run the same number of steps: see
    :class:`~flexact.datamodules.sampling.EpochShardSampler`, the loader's ``sampler``.

    Like a ``DataLoader`` with a ``DistributedSampler``, it changes its order only when the
    epoch is set: Lightning's fit loop calls ``sampler.set_epoch`` at every epoch start with
    the trainer's epoch, so a resumed run continues with the right permutation. Like
    :class:`~flexact.datamodules.sampling.ResumableDataLoader`, it is stateful: Lightning saves
    its position (epoch and batches yielded) in checkpoints, and a loader given that state
    skips the batches already trained on.

    Args:
        tensors: Tensors with the same first dimension, on one device.
        batch_size: Samples per batch.
        shuffle: Draw a new permutation every epoch.
        seed: Base seed of the permutations.
        rank: This process's global rank.
        world_size: Number of processes.
    """

    def __init__(self, tensors: Sequence[Tensor], batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.tensors = tuple(tensors)
        self.batch_size = batch_size
        self.num_samples = len(self.tensors[0])
        self.sampler = EpochShardSampler(self.num_samples, rank, world_size, seed=seed,
                                         shuffle=shuffle)
        self.batch_sampler = None  # as a DataLoader with a sampler (Lightning reads both)
        self._epoch_of_live: int | None = None
        self._yielded = 0
        self._resume: dict[str, Any] | None = None

    @property
    def epoch(self) -> int:
        """The epoch whose permutation the next iteration serves."""
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (Lightning does it through ``sampler``)."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        # A generator: this runs at the first next(), after Lightning has set the epoch and
        # loaded the saved position.
        epoch = self.sampler.epoch
        resume, self._resume = self._resume, None
        skip = resume_skip(resume, epoch, len(self))
        self._epoch_of_live, self._yielded = epoch, skip
        order = self.sampler.indices().to(self.tensors[0].device)
        for start in range(skip * self.batch_size, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            self._yielded += 1  # counted when handed out, as a DataLoader's iterator does
            yield tuple(t[index] for t in self.tensors)

    def state_dict(self) -> dict[str, Any]:
        """Epoch and batches yielded in it so far (Lightning stores it in checkpoints)."""
        return {"epoch": self._epoch_of_live, "batches": self._yielded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Skip the saved number of batches at the start of the saved epoch."""
        epoch, batches = state_dict.get("epoch"), int(state_dict.get("batches", 0))
        self._resume = {"epoch": epoch, "batches": batches}
        if isinstance(epoch, int):  # as ResumableDataLoader: also right without Lightning
            self.sampler.set_epoch(epoch if batches < len(self) else epoch + 1)
