"""``CIFAR10DataModule``: CIFAR-10 from the official python pickle batches (docs/method.md §3.2)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from flexact.datamodules._common import (
    DatasetError,
    fetch_archive,
    missing_message,
    raise_if_missing,
)
from flexact.datamodules._images import ImageDataModule

__all__ = ["CIFAR10_MD5", "CIFAR10_URL", "CIFAR10DataModule", "read_cifar_batch"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
"""The official archive (the one torchvision downloads)."""
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
"""MD5 of the official archive."""

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
IMAGE_SIZE = 3 * 32 * 32

# The pickles hold only numpy arrays, lists, ints and strings; anything else is refused instead
# of executed (unpickling runs code named in the file).
_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module = module.replace("numpy.core.", "numpy._core.")  # pickles from numpy < 2
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the pickle")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(missing_message("CIFAR-10", [path], "set data.download true, or "
                                           "extract cifar-10-python.tar.gz into data_dir"))
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as err:
        raise DatasetError(
            f"{path} is truncated or corrupt ({type(err).__name__}: {err}); delete the "
            f"{FOLDER} folder and run again with data.download true"
        ) from err
    if not isinstance(entry, dict):
        raise DatasetError(f"{path} is not a CIFAR-10 batch (it holds a {type(entry).__name__}, "
                           "not a dict); delete it and download again")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def read_cifar_batch(path: str | Path, num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Read one CIFAR python batch file (``data_batch_1`` … ``test_batch``).

    Args:
        path: The pickle file.
        num_classes: Labels must lie in ``[0, num_classes)``.

    Returns:
        ``(uint8 images (N, 3, 32, 32), int64 labels (N,))``.

    Raises:
        DatasetError: If the file is missing, truncated, corrupt, or not a CIFAR batch.
    """
    path = Path(path)
    entry = _unpickle(path)
    data = entry.get("data")
    labels = entry.get("labels", entry.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != IMAGE_SIZE:
        shape = getattr(data, "shape", None)
        raise DatasetError(f"{path} is not a CIFAR batch: 'data' must be a uint8 array of shape "
                           f"(N, {IMAGE_SIZE}), got {type(data).__name__} {shape}; delete it "
                           "and download again")
    if labels is None or len(labels) != len(data):
        raise DatasetError(f"{path} is corrupt: {len(data)} images but "
                           f"{'no' if labels is None else len(labels)} labels; delete it and "
                           "download again")
    targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise DatasetError(f"{path} is corrupt: labels outside 0..{num_classes - 1}; delete it "
                           "and download again")
    images = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))
    return images, targets


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 50 000 training and 10 000 test colour images of 32×32 pixels in 10 classes.

    Reads torchvision's layout, ``<data_dir>/cifar-10-batches-py/`` with ``data_batch_1`` …
    ``data_batch_5``, ``test_batch`` and ``batches.meta`` (the official python pickles). The
    validation split is carved from the training set with ``seed``. Training batches get the
    standard augmentation (RandomCrop 32 with padding 4, horizontal flip); every batch is
    normalized with the training set's channel statistics. Augmentation runs on the device in
    ``on_after_batch_transfer``.

    Takes the arguments of :class:`~flexact.datamodules.ImageDataModule` (``data_dir``,
    ``download``, ``val_split``, ``seed``, ``batch_size``, ``num_workers``, ``augment``: random
    crop and flip, ``on_device``) and its own:

    Args:
        url: Address of ``cifar-10-python.tar.gz`` (the official one by default; a mirror works).
        check_md5: Verify the downloaded archive against the official MD5.
        **kwargs: The arguments of :class:`~flexact.datamodules.ImageDataModule`.
    """

    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    crop_padding = 4
    flip = True
    num_classes = 10
    dataset_name = "CIFAR-10"

    def __init__(self, *, url: str = CIFAR10_URL, check_md5: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url = url
        self.check_md5 = check_md5
        self.root = Path(self.data_dir) / FOLDER

    def _files(self) -> list[Path]:
        return [self.root / name for name in (*TRAIN_FILES, *TEST_FILES, META_FILE)]

    def data_present(self) -> bool:
        """Whether all six batches and ``batches.meta`` exist."""
        return all(p.is_file() for p in self._files())

    def download_data(self) -> None:
        """Download ``cifar-10-python.tar.gz`` (unless already there) and extract it."""
        data_dir = Path(self.data_dir)
        fetch_archive(self.url, data_dir / "cifar-10-python.tar.gz", data_dir, self._files(),
                      CIFAR10_MD5 if self.check_md5 else None)

    def load_split(self, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
        """Read the five training batches or the test batch, and the class names."""
        raise_if_missing("CIFAR-10", [p for p in self._files() if not p.is_file()],
                         "set data.download true to fetch it, or extract "
                         f"cifar-10-python.tar.gz into {self.data_dir}", self.hparams.download)
        meta = _unpickle(self.root / META_FILE)
        names = meta.get("label_names")
        if not isinstance(names, list) or len(names) != self.num_classes:
            raise DatasetError(f"{self.root / META_FILE} is corrupt: expected "
                               f"{self.num_classes} label_names; delete it and download again")
        self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        parts = [read_cifar_batch(self.root / name, self.num_classes)
                 for name in (TRAIN_FILES if split == "train" else TEST_FILES)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
