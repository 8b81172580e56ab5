"""Measuring what training keeps in memory (pure PyTorch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["saved_bytes"]


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs.

    Storages are counted once however many saved tensors view them (a ReLU's output that the
    next layer also keeps counts once). This is the memory a training step holds between forward
    and backward, measured the same way on every device.

    Args:
        fn: Runs a forward pass (its result is discarded; call backward outside if needed).

    Returns:
        The byte count.
    """
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
