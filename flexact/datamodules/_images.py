"""Base class of the image data modules: uint8 tensors in memory, augmentation by the batch.

Images stay ``uint8`` (N, C, H, W) from disk to device: 4× less memory and transfer than float.
Augmentation (random crop with zero padding, horizontal flip) and normalization run on whole
batches in :meth:`ImageDataModule.on_after_batch_transfer`, i.e. on the accelerator when there is
one. With ``on_device`` the whole data set also lives on the accelerator and batches are drawn
by indexing it, so no host work is left in the training loop.

The batch augmentations live in :mod:`~flexact.datamodules.augment` and the on-device loader in
:mod:`~flexact.datamodules.loaders`; both are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import TensorDataset

from flexact.datamodules.augment import random_crop, random_hflip
from flexact.datamodules.base import SplitDataModule
from flexact.datamodules.loaders import TensorBatchLoader
from flexact.datamodules.sampling import run_seed
from flexact.errors import ConfigError

# TensorBatchLoader, random_crop and random_hflip: re-exported for existing imports.
__all__ = ["ImageDataModule", "TensorBatchLoader", "photometric_shift", "random_crop",
           "random_hflip"]

OnDevice = bool | Literal["auto"]
ValShift = Literal["none", "brightness", "contrast", "invert"]


def photometric_shift(images: Tensor, shift: str, strength: float) -> Tensor:
    """A new uint8 batch with a deterministic photometric shift (the input is left alone).

    ``brightness`` adds ``strength·255`` and clamps to [0, 255]; ``contrast`` maps
    ``x ← mean + (1 − strength)(x − mean)`` with each image's mean over all its pixels;
    ``invert`` gives ``255 − x`` when ``strength ≥ 0.5`` (and leaves the images as they are
    otherwise); ``none`` copies. Values are rounded to the nearest integer.
    """
    x = images.float()
    if shift == "brightness":
        x = x + strength * 255.0
    elif shift == "contrast":
        mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        x = mean + (1.0 - strength) * (x - mean)
    elif shift == "invert" and strength >= 0.5:
        x = 255.0 - x
    return x.round_().clamp_(0, 255).to(torch.uint8)


class ImageDataModule(SplitDataModule):
    """Image classification from uint8 tensors, augmented and normalized by the batch.

    Subclasses set the class attributes and implement :meth:`download_data`,
    :meth:`load_split` and :meth:`data_present`. The arguments below are every image module's:
    a subclass's ``__init__`` takes only its own arguments and passes the rest on
    (``**kwargs``), and the CLI reads both, so ``--data.help`` lists all of them.

    Every split is a pair ``(uint8 images (N, C, H, W), int64 labels (N,))`` in
    :attr:`splits`. Training batches come in an order that is a pure function of the run's
    seed and the epoch, the training loader resumes mid-epoch, and the random augmentation of
    a training batch is a pure function of the run's seed, the rank and the batch's index in
    the run (it never draws from the global generator), so a run resumed from any checkpoint
    sees exactly the batches of the uninterrupted run, on or off the device.

    Args:
        data_dir: Folder that holds (or will hold) the data set's files, in the layout the
            data module describes.
        download: Fetch the official files into ``data_dir`` when they are missing (in
            ``prepare_data``, once per node).
        val_split: Fraction of the training images held out for validation (drawn with
            ``seed``); 0 trains on the whole training set and validates on the test set.
        seed: Seed of the validation split; also of the shuffling and the augmentation when
            the run has no seed of its own (``seed_everything``).
        batch_size: Images per batch (per device under DDP).
        num_workers: DataLoader worker processes (the data are already tensors in memory, so 0
            is usually fastest).
        augment: Random crops (and flips, where the data set allows them) for training
            batches.
        on_device: Keep the whole data set on the accelerator as uint8 and draw batches there:
            ``true``, ``false``, or ``auto`` (only when the accelerator is not the CPU).
        val_shift: A held-out photometric shift: fitness on shifted validation data. The
            validation images (only those; train and test stay untouched, also when
            ``val_split`` is 0 and validation uses a copy of the test set) are transformed
            once, deterministically, before normalization: ``brightness`` adds
            ``shift_strength·255`` and clamps, ``contrast`` scales each image about its mean by
            ``1 − shift_strength``, ``invert`` gives ``255 − x`` when ``shift_strength ≥ 0.5``;
            ``none`` leaves them alone.
        shift_strength: Strength of ``val_shift``, in [0, 1].
    """

    mean: tuple[float, ...] = (0.5,)
    """Per-channel mean of the training images (in [0, 1])."""
    std: tuple[float, ...] = (0.5,)
    """Per-channel standard deviation of the training images."""
    crop_padding: int = 0
    """Zero padding of the random crop when ``augment`` is on (0: no crop)."""
    flip: bool = False
    """Random horizontal flips when ``augment`` is on."""
    num_classes: int = 10
    """Number of classes."""
    dataset_name: str = "images"
    """Name used in messages."""

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        val_split: float = 0.1,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        augment: bool = True,
        on_device: OnDevice = "auto",
        val_shift: ValShift = "none",
        shift_strength: float = 0.5,
    ) -> None:
        if not (isinstance(val_split, (int, float)) and 0 <= val_split < 1):
            raise ConfigError(f"val_split must be a fraction in [0, 1), got {val_split!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers!r}")
        if on_device not in (True, False, "auto"):
            raise ConfigError(f"on_device must be true, false or 'auto', got {on_device!r}")
        if val_shift not in ("none", "brightness", "contrast", "invert"):
            raise ConfigError(f"val_shift must be 'none', 'brightness', 'contrast' or 'invert', "
                              f"got {val_shift!r}")
        if isinstance(shift_strength, bool) or not isinstance(shift_strength, (int, float)) \
                or not 0 <= shift_strength <= 1:
            raise ConfigError(f"shift_strength must be a number in [0, 1], got {shift_strength!r}")
        super().__init__(batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.num_outputs = self.num_classes
        self.num_features: int | None = None  # the backbone gives the feature size
        self.classes: list[str] = [str(i) for i in range(self.num_classes)]
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}  # type: ignore[assignment]
        self._device_resident = False
        self._augment_generators: dict[torch.device, torch.Generator] = {}

    # ------------------------------------------------------------------ subclass interface
    def data_present(self) -> bool:
        """Whether every file of the data set is on disk."""
        raise NotImplementedError

    def download_data(self) -> None:
        """Fetch the official files into ``data_dir`` (called by :meth:`prepare_data`)."""
        raise NotImplementedError

    def load_split(self, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
        """Read one official split: ``(uint8 images (N, C, H, W), int64 labels (N,))``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Download the data set if ``download`` is set and it is not on disk yet."""
        if self.hparams.download and not self.data_present():
            self.download_data()

    def _target_device(self) -> torch.device:
        trainer = self.trainer
        if trainer is None:
            return torch.device("cpu")
        return trainer.strategy.root_device

    def setup(self, stage: str | None = None) -> None:
        """Read the splits the stage needs, carve the validation split, place the tensors."""
        hp = self.hparams
        need_train = stage in (None, "fit", "validate")
        need_test = stage in (None, "test", "predict") or (need_train and hp.val_split == 0)
        device = self._target_device()
        on_device = hp.on_device if hp.on_device != "auto" else device.type != "cpu"
        self._device_resident = bool(on_device)
        target = device if on_device else torch.device("cpu")
        if need_train and "train" not in self.splits:
            images, labels = self.load_split("train")
            if hp.val_split > 0:
                generator = torch.Generator().manual_seed(hp.seed)
                order = torch.randperm(len(labels), generator=generator)
                n_val = max(1, round(hp.val_split * len(labels)))
                if n_val >= len(labels):
                    raise ConfigError(f"val_split={hp.val_split} leaves no training images out of "
                                      f"{len(labels)}; lower it")
                val, train = order[:n_val], order[n_val:]
                self.splits["val"] = self._shift_val((images[val], labels[val]))
                self.splits["train"] = (images[train], labels[train])
            else:
                self.splits["train"] = (images, labels)
        if need_test and "test" not in self.splits:
            self.splits["test"] = self.load_split("test")
        if hp.val_split == 0 and "test" in self.splits and "val" not in self.splits:
            self.splits["val"] = self._shift_val(self.splits["test"])  # validate on the test set
        moved: dict[int, tuple[Tensor, Tensor]] = {}  # val may be the test split: move it once
        for name, (images, labels) in list(self.splits.items()):
            if images.device != target:
                key = id(self.splits[name])
                if key not in moved:
                    moved[key] = (images.to(target), labels.to(target))
                self.splits[name] = moved[key]
        if on_device:
            rank_zero_info(f"{self.dataset_name}: data set kept on {target} as uint8")

    def _shift_val(self, split: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The validation split with ``val_shift`` applied to a copy of its images."""
        if self.hparams.val_shift == "none":
            return split  # may be the test split itself: nothing is modified
        hp = self.hparams
        return photometric_shift(split[0], hp.val_shift, hp.shift_strength), split[1]

    def _dataset(self, split: str) -> TensorDataset:
        return TensorDataset(*super()._dataset(split))  # type: ignore[misc]

    def _pin_memory(self) -> bool:
        return self._target_device().type == "cuda"

    def _loader(self, split: str, train: bool) -> Iterable[Any]:
        if not self._device_resident:
            return super()._loader(split, train)
        dataset = self._dataset(split)
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        return TensorBatchLoader(dataset.tensors, self.batch_size, shuffle=train,
                                 seed=run_seed(self.seed), rank=rank, world_size=world)

    # ------------------------------------------------------------------ batch transforms
    def transform_batch(self, images: Tensor, train: bool,
                        generator: torch.Generator | None = None) -> Tensor:
        """Augment (when training and ``augment`` is on) and normalize a uint8 batch.

        Args:
            images: ``(N, C, H, W)`` uint8 batch, on any device.
            train: Apply the random augmentation.
            generator: Random generator of the augmentation, on the batch's device (default:
                the global one).

        Returns:
            A float32 batch, normalized per channel.
        """
        if train and self.hparams.augment:
            images = random_crop(images, self.crop_padding, generator)
            if self.flip:
                images = random_hflip(images, generator)
        x = images.float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def _augment_generator(self, device: torch.device) -> torch.Generator:
        """The generator of the training batch about to run, seeded from its place in the run.

        The seed mixes the run's seed, the rank and the number of training batches the run has
        started before this one (Lightning restores that count on resume), so the batch's
        augmentation is the same in a resumed run, and drawing it leaves the global generator
        (the Gumbel noise's) alone.
        """
        trainer = self.trainer
        assert trainer is not None
        batch_index = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        entropy = [run_seed(self.seed) % 2**64, trainer.global_rank, batch_index]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])
        generator = self._augment_generators.get(device)
        if generator is None:
            generator = self._augment_generators[device] = torch.Generator(device=device)
        return generator.manual_seed(seed)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment and normalize each uint8 batch once it is on the device."""
        images, labels = batch
        if images.dtype == torch.uint8:
            trainer = self.trainer
            train = trainer is not None and trainer.training
            augment = train and self.hparams.augment
            generator = self._augment_generator(images.device) if augment else None
            images = self.transform_batch(images, train=train, generator=generator)
        return images, labels
