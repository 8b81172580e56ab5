"""Measuring what training keeps in memory (pure PyTorch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["kernel_count", "saved_bytes"]


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


# Operators that only make a new view, read metadata or allocate: no kernel runs on a device.
_NO_KERNEL = frozenset({
    "alias", "as_strided", "detach", "empty", "empty_like", "empty_strided", "expand",
    "lift_fresh", "new_empty", "new_empty_strided", "permute", "reshape", "select", "slice",
    "squeeze", "t", "transpose", "unsqueeze", "view", "_unsafe_view", "_reshape_alias",
    "_record_function_enter_new", "_record_function_exit", "promote_types", "is_same_size",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "stride",
})


class _KernelCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func.overloadpacket.__name__ not in _NO_KERNEL:
            self.count += 1
        return func(*args, **(kwargs or {}))


def kernel_count(fn: Callable[[], Any]) -> int:
    """Number of ATen operators that run a kernel while ``fn`` runs (forward, backward, ...).

    In eager mode on a GPU each is one kernel launch, a few microseconds of host time whatever
    the tensor size: the count predicts the launch overhead of a training step on any device.
    Views, metadata queries and bare allocations are not counted.

    Args:
        fn: The work to count (e.g. one training step).

    Returns:
        The operator count.
    """
    counter = _KernelCounter()
    with counter:
        fn()
    return counter.count
