"""Clearing the optimizers' state at a commit (``SelectionCommit(reset_optimizer=True)``).

At a commit the network becomes another function, but the optimizer's state (Adam's moments,
SGD's momentum) was gathered under the mixture: cleared, each parameter starts afresh at its
next step, Adam's bias correction included. The selection logits of layers still choosing keep
theirs: their layers have not changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

from flexact.errors import ConfigError

__all__ = ["check_clearable", "clear_state"]


def check_clearable(owner: str, optimizers: Sequence[Any]) -> None:
    """Refuse optimizers whose state cannot be cleared to a fresh start.

    Args:
        owner: The callback, named in the message.
        optimizers: The trainer's optimizers.

    Raises:
        ConfigError: If an optimizer has no ``state`` dict, or counts its steps in its parameter
            groups (apex's or DeepSpeed's fused Adam): cleared moments would then be corrected
            for the old step count, and the first steps would be far too long.
    """
    for optimizer in optimizers:
        name = type(optimizer).__name__
        if not isinstance(getattr(optimizer, "state", None), dict):
            raise ConfigError(f"{owner} reset_optimizer clears each optimizer's state dict, but "
                              f"{name} has none: set reset_optimizer: false")
        if any("step" in group for group in getattr(optimizer, "param_groups", ())):
            raise ConfigError(f"{owner} reset_optimizer cannot restart {name}: it counts its "
                              f"steps in its parameter groups, which a cleared state keeps; set "
                              f"reset_optimizer: false")


def clear_state(optimizers: Sequence[Any], keep: Iterable[Tensor]) -> None:
    """Drop every parameter's optimizer state except that of the parameters in ``keep``.

    Args:
        optimizers: The trainer's optimizers (their ``state`` is changed in place, so wrappers
            sharing it, as Lightning's do, see the change).
        keep: Parameters whose state stays (the logits of layers still selecting).
    """
    kept = {id(param) for param in keep}
    for optimizer in optimizers:
        for param in [p for p in optimizer.state if id(p) not in kept]:
            del optimizer.state[param]
