"""Data order as a pure function of (seed, epoch), sharding across ranks, mid-epoch resume.

Exact resume needs the data order of every epoch to be reproducible without replaying the
run, and a multi-device run needs every rank to agree on it. Everything here follows the rule of
``torch.utils.data.DistributedSampler`` (which Lightning injects under DDP): epoch ``e`` is
``randperm(n)`` drawn from a generator seeded with ``seed + e``, padded by repetition to a
multiple of the number of ranks, and rank ``r`` takes every ``world_size``-th index from ``r``.
One device is the special case ``world_size = 1``, so one device with batch ``N·B`` sees, step by
step, the same samples as ``N`` devices with batch ``B`` each.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler

__all__ = [
    "EpochRandomSampler",
    "EpochShardSampler",
    "ResumableDataLoader",
    "resume_skip",
    "run_seed",
    "shard_indices",
]


def run_seed(default: int = 0) -> int:
    """The run's seed as Lightning's samplers see it.

    ``PL_GLOBAL_SEED`` (set by ``seed_everything``), else ``default``.
    """
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None else default


def shard_indices(
    num_samples: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> torch.Tensor:
    """This rank's indices for one epoch, exactly as ``DistributedSampler`` would give them.

    For data that never passes through a ``DataLoader`` (e.g. a data set kept on the device and
    indexed in place), call it once per epoch with ``trainer.global_rank``,
    ``trainer.world_size`` and ``trainer.current_epoch``: the order is then a pure function of
    ``(seed, epoch)``, identical on every rank and after a resume, and the ranks' shards
    partition the epoch.

    Args:
        num_samples: Size of the data set.
        rank: This process's global rank, in ``[0, world_size)``.
        world_size: Number of processes.
        seed: Base seed of the permutation (the same on every rank).
        epoch: Epoch number; each epoch draws a new permutation.
        shuffle: Permute (else keep the natural order).
        drop_last: Drop the tail that does not divide evenly among the ranks, instead of padding
            it with repeated indices.

    Returns:
        A 1-D ``int64`` tensor of indices; every rank gets the same length.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(num_samples, generator=generator)
    else:
        order = torch.arange(num_samples)
    if drop_last and num_samples % world_size:
        per_rank = math.ceil((num_samples - world_size) / world_size)
    else:
        per_rank = math.ceil(num_samples / world_size)
    total = per_rank * world_size
    if total > num_samples and num_samples > 0:  # pad by repetition, as DistributedSampler
        repeats = math.ceil((total - num_samples) / num_samples)
        order = torch.cat([order, order.repeat(repeats)[: total - num_samples]])
    return order[:total][rank:total:world_size]


class EpochRandomSampler(RandomSampler):
    """Random order that is a pure function of ``(seed, epoch)``; Lightning sets the epoch.

    A ``RandomSampler`` draws each epoch's order from the global generator, so the order after a
    resume depends on everything that consumed random numbers before. This one does not. It
    subclasses ``RandomSampler`` so that under DDP Lightning replaces it by a
    ``DistributedSampler`` with the run's seed, which follows the same rule (see
    :func:`shard_indices`).

    Args:
        data_source: The data set (only its length is used).
        seed: Base seed; :func:`run_seed` gives the one Lightning's ``DistributedSampler`` uses.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (called by Lightning at every epoch start)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        yield from shard_indices(len(self.data_source), seed=self.seed,
                                 epoch=self.epoch).tolist()

    def __len__(self) -> int:
        return len(self.data_source)


class EpochShardSampler(Sampler[int]):
    """This rank's shard of epoch ``e``'s order (:func:`shard_indices`); Lightning sets the epoch.

    For a loader that is not a ``DataLoader`` (e.g. one that indexes a data set kept on the
    device), to which Lightning therefore never gives a ``DistributedSampler``: it shards by
    itself, exactly as ``DistributedSampler`` would, and like it changes its order only when
    ``set_epoch`` is called, which Lightning's fit loop does at every epoch start on the
    ``sampler`` attribute of every training loader.

    Args:
        num_samples: Size of the data set.
        rank: This process's global rank.
        world_size: Number of processes.
        seed: Base seed; :func:`run_seed` gives the one Lightning's ``DistributedSampler`` uses.
        shuffle: Permute every epoch (else keep the natural order).
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, *, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.num_samples = int(num_samples)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.indices()  # checks the arguments

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (called by Lightning at every epoch start)."""
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """The current epoch's indices for this rank, as a 1-D ``int64`` tensor."""
        return shard_indices(self.num_samples, self.rank, self.world_size, seed=self.seed,
                             epoch=self.epoch, shuffle=self.shuffle)

    def __iter__(self) -> Iterator[int]:
        yield from self.indices().tolist()

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)


def resume_skip(resume: dict[str, Any] | None, epoch: int | None, num_batches: int) -> int:
    """How many batches a loader starting ``epoch`` skips, given a saved position.

    Args:
        resume: A loader's saved ``{"epoch": e, "batches": b}`` (``None``: not resuming).
        epoch: The epoch now starting.
        num_batches: Batches in a whole epoch.

    Returns:
        ``b`` when the saved position lies inside this very epoch, else 0 (a finished epoch, or
        one other than the saved one, starts from its beginning).
    """
    if resume is None or resume.get("epoch") != epoch:
        return 0
    batches = int(resume.get("batches", 0))
    return batches if batches < num_batches else 0


class _SkipFirst:
    """Index sampler that skips the batches a resumed epoch has already trained on."""

    def __init__(self, base: Any, loader: ResumableDataLoader) -> None:
        self.base = base
        self.loader = loader

    def __len__(self) -> int:
        return len(self.base)  # the epoch's full length: Lightning counts the skipped batches

    def __iter__(self) -> Iterator[Any]:
        # A generator: this runs at the first next(), after Lightning has called set_epoch.
        skip = self.loader._start_epoch()
        iterator = iter(self.base)
        for _ in range(skip):
            next(iterator, None)  # indices only: the skipped samples are never loaded
        yield from iterator


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning can resume in the middle of an epoch.

    Lightning saves the ``state_dict`` of stateful training loaders in checkpoints and loads it
    back on ``ckpt_path`` resume. The state is the epoch and the number of batches already
    yielded in it; the resumed loader skips those batches (by index, without loading them), so
    together with a sampler whose order is a function of ``(seed, epoch)`` (such as
    :class:`EpochRandomSampler` or Lightning's ``DistributedSampler``) the resumed run sees
    exactly the batches the uninterrupted run would. It takes every ``DataLoader`` argument.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._live: Any = None  # the current epoch's iterator
        self._epoch_of_live: int | None = None
        self._skipped = 0
        self._resume: dict[str, Any] | None = None

    @property
    def _index_sampler(self) -> Any:
        return _SkipFirst(super()._index_sampler, self)

    def _sampler_epoch(self) -> int | None:
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            epoch = getattr(sampler, "epoch", None)
            if isinstance(epoch, int):
                return epoch
        return None

    def _start_epoch(self) -> int:
        """Called when an epoch's indices start: how many batches to skip (0 unless resuming)."""
        epoch = self._sampler_epoch()
        resume, self._resume = self._resume, None
        skip = resume_skip(resume, epoch, len(self))
        self._epoch_of_live = epoch
        self._skipped = skip
        return skip

    def __iter__(self) -> Any:
        self._live = super().__iter__()
        return self._live

    def state_dict(self) -> dict[str, Any]:
        """Epoch and batches yielded in it so far (Lightning stores it in checkpoints)."""
        live = self._live
        yielded = 0 if live is None else int(getattr(live, "_num_yielded", 0)) + self._skipped
        return {"epoch": self._epoch_of_live, "batches": yielded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Skip the saved number of batches at the start of the saved epoch."""
        epoch, batches = state_dict.get("epoch"), int(state_dict.get("batches", 0))
        self._resume = {"epoch": epoch, "batches": batches}
        # Worker processes fetch indices as soon as the iterator exists, before Lightning sets
        # the epoch; set it now so they start from the right permutation.
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch) and isinstance(epoch, int):
            set_epoch(epoch if batches < len(self) else epoch + 1)
