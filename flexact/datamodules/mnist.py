"""``MNISTDataModule``: MNIST from the official idx files (docs/method.md §4, LeNet5)."""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from flexact.datamodules._common import (
    DatasetError,
    download_file,
    gunzip,
    missing_message,
    raise_if_missing,
)
from flexact.datamodules._images import ImageDataModule

__all__ = ["MNIST_FILES", "MNIST_MIRRORS", "MNISTDataModule", "read_idx"]

MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
"""Where torchvision downloads MNIST from, tried in order."""

MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
"""The four raw files and the MD5 of their official ``.gz`` archives."""

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read a uint8 idx file (the MNIST format), plain or gzip-compressed.

    Args:
        path: The file; a name ending in ``.gz`` is decompressed on the fly.

    Returns:
        The array, shaped as the file's header says.

    Raises:
        DatasetError: If the file is missing, truncated, or not a uint8 idx file.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError(missing_message("MNIST", [path], "set data.download true")) from None
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"{path} is truncated or corrupt ({err}); delete it and run again "
                           "with data.download true") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 3:
        raise DatasetError(f"{path} is not a uint8 idx file (bad magic number {data[:4].hex()}); "
                           "delete it and download again")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated (header incomplete); delete it and download again")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(shape)
    if len(data) != expected:
        raise DatasetError(f"{path} is truncated or corrupt: the header announces shape {shape} "
                           f"({expected} bytes) but the file has {len(data)} bytes; delete it "
                           "and download again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class MNISTDataModule(ImageDataModule):
    """MNIST: 60 000 training and 10 000 test grey-scale digits of 28×28 pixels.

    Reads torchvision's layout, ``<data_dir>/MNIST/raw/`` with ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``
    (each may also be present only as its ``.gz``). The validation split is carved from the
    training set with ``seed``; batches are normalized with the training set's mean and
    standard deviation, on the device.

    Takes the arguments of :class:`~flexact.datamodules.ImageDataModule` (``data_dir``,
    ``download``, ``val_split``, ``seed``, ``batch_size``, ``num_workers``, ``on_device``) and
    its own:

    Args:
        augment: Random crops with 2 pixels of zero padding for training batches (off by
            default: MNIST is usually trained without augmentation).
        mirrors: Base URLs tried in order; each must serve ``<name>.gz`` for the four files.
        check_md5: Verify the downloaded files against the official MD5 checksums.
        **kwargs: The arguments of :class:`~flexact.datamodules.ImageDataModule`.
    """

    mean = (0.1307,)
    std = (0.3081,)
    crop_padding = 2
    flip = False
    num_classes = 10
    dataset_name = "MNIST"

    def __init__(self, *, augment: bool = False, mirrors: Sequence[str] = MNIST_MIRRORS,
                 check_md5: bool = True, **kwargs: Any) -> None:
        super().__init__(augment=augment, **kwargs)
        self.mirrors = [m if m.endswith("/") else m + "/" for m in mirrors]
        self.check_md5 = check_md5
        self.root = Path(self.data_dir) / "MNIST" / "raw"

    def _path(self, name: str) -> Path | None:
        for candidate in (self.root / name, self.root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def data_present(self) -> bool:
        """Whether the four raw files (or their ``.gz``) exist."""
        return all(self._path(name) is not None for name in MNIST_FILES)

    def download_data(self) -> None:
        """Download each missing file from the first mirror that answers, then decompress it."""
        for name, md5 in MNIST_FILES.items():
            if (self.root / name).is_file():
                continue
            archive = self.root / f"{name}.gz"
            if not archive.is_file():
                errors = []
                for mirror in self.mirrors:
                    try:
                        download_file(f"{mirror}{name}.gz", archive,
                                      md5 if self.check_md5 else None)
                        break
                    except DatasetError as err:
                        errors.append(str(err))
                else:
                    raise DatasetError(f"could not download {name}.gz from any mirror: "
                                       + " | ".join(errors))
            gunzip(archive, self.root / name)

    def load_split(self, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
        """Read the idx images and labels of a split."""
        image_name, label_name = _SPLIT_FILES[split]
        paths = {name: self._path(name) for name in (image_name, label_name)}
        missing = [self.root / name for name, path in paths.items() if path is None]
        raise_if_missing("MNIST", missing, "set data.download true to fetch them, or put the "
                         f"official idx files (or their .gz) in {self.root}", self.hparams.download)
        image_path, label_path = paths[image_name], paths[label_name]
        assert image_path is not None and label_path is not None
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{image_path} and {label_path} do not match: images of shape "
                f"{list(images.shape)}, labels of shape {list(labels.shape)}; download again"
            )
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise DatasetError(f"{label_path} is corrupt: labels outside 0..9; download again")
        x = torch.from_numpy(images.copy()).unsqueeze(1)
        return x, torch.from_numpy(labels.astype(np.int64))
