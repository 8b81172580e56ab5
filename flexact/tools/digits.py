"""scikit-learn's handwritten digits written in the MNIST and CIFAR-10 on-disk formats.

A real (if small) image task that runs on this machine without a download: 1 797 8×8 digits,
bundled with scikit-learn. :func:`write_digits_mnist` upsamples them to 28×28 grey images in
MNIST's idx files; :func:`write_digits_cifar` paints them at 24×24 in a random bright
colour, ±2 pixels off centre, on a random dark 32×32 background, in CIFAR-10's pickled batches
(colour and place carry no class information, so the network must find the shape). The split
is fixed: the first 1 500 digits train, the other 297 test. torchvision's ``MNIST`` class and
flexact's ``MNISTDataModule``/``CIFAR10DataModule`` read them as they read the real sets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flexact.tools.fake_data import write_cifar_batches, write_idx

__all__ = ["N_TRAIN", "digit_images", "write_digits_cifar", "write_digits_mnist"]

N_TRAIN = 1500
"""Digits in the training split; the remaining 297 are the test split."""


def digit_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 images ``(1797, size, size)`` (bilinear upsampling) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float()[:, None] / 16.0
    big = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return (big[:, 0].clamp(0, 1) * 255).round().numpy().astype(np.uint8), digits.target


def write_digits_mnist(root: str | Path) -> Path:
    """Write the digits as ``<root>/MNIST/raw/*-idx?-ubyte`` (28×28). Returns the raw folder."""
    images, labels = digit_images(28)
    raw = Path(root) / "MNIST" / "raw"
    for prefix, part in (("train", slice(0, N_TRAIN)), ("t10k", slice(N_TRAIN, None))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[part])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[part].astype(np.uint8))
    return raw


def write_digits_cifar(root: str | Path, seed: int = 0) -> Path:
    """Write the digits as coloured 32×32 images in ``<root>/cifar-10-batches-py``.

    Returns:
        The batches folder.
    """
    rng = np.random.default_rng(seed)
    shapes, labels = digit_images(24)
    n = len(labels)
    background = rng.integers(0, 96, (n, 3, 1, 1))  # dark, so that the bright ink shows
    ink = rng.integers(160, 256, (n, 3, 1, 1))
    out = np.broadcast_to(background, (n, 3, 32, 32)).astype(np.float32).copy()
    for i, (dy, dx) in enumerate(rng.integers(2, 7, (n, 2))):  # jitter of ±2 pixels
        alpha = shapes[i].astype(np.float32)[None] / 255.0
        patch = out[i, :, dy:dy + 24, dx:dx + 24]
        out[i, :, dy:dy + 24, dx:dx + 24] = (1 - alpha) * patch + alpha * ink[i]
    out = np.clip(out + rng.normal(0, 8, out.shape), 0, 255).astype(np.uint8)
    return write_cifar_batches(root, out[:N_TRAIN], labels[:N_TRAIN], out[N_TRAIN:],
                               labels[N_TRAIN:])
