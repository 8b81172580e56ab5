"""Random augmentation of whole image batches, on whatever device the batch is on.

Both functions take a batch ``(N, C, H, W)`` of any dtype (the image data modules pass uint8)
and an optional :class:`torch.Generator` on the batch's device, so the draws can be made a pure
function of a seed without touching the global generator (see
:class:`~flexact.datamodules.ImageDataModule`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_crop", "random_hflip"]


def random_crop(images: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Per-image random crop of a zero-padded batch back to its size (``RandomCrop(pad=p)``).

    Args:
        images: Batch ``(N, C, H, W)`` of any dtype, on any device.
        padding: Zero padding added on every side before cropping.
        generator: Random generator on the batch's device (default: the global one).

    Returns:
        A batch shaped like ``images``.
    """
    if padding <= 0:
        return images
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    device = images.device
    offset_y = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    offset_x = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    rows = offset_y + torch.arange(h, device=device)  # (N, H)
    cols = offset_x + torch.arange(w, device=device)  # (N, W)
    batch = torch.arange(n, device=device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=device).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def random_hflip(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image of a batch ``(N, C, H, W)`` left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
