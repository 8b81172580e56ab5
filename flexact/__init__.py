"""flexact: networks that pick their activation functions while they train.

The top-level package is the pure-PyTorch core (no Lightning import): the :class:`FlexAct`
layer, :class:`FlexActHead`, the bias-correcting regularizer :func:`selection_kl`, and the
candidate registry. The Lightning layer lives in ``flexact.modules``, ``flexact.callbacks``,
``flexact.datamodules`` and ``flexact.cli``.
"""

from flexact.activations import (
    PAPER_CANDIDATES,
    available_activations,
    get_activation,
    register_activation,
)
from flexact.errors import ConfigError
from flexact.layers import FlexAct, FlexActHead, flexact_layers, mixture, selection_kl
from flexact.surgery import freeze_selection, swap_activations

__version__ = "0.1.0"

__all__ = [
    "PAPER_CANDIDATES",
    "ConfigError",
    "FlexAct",
    "FlexActHead",
    "__version__",
    "available_activations",
    "flexact_layers",
    "freeze_selection",
    "get_activation",
    "mixture",
    "register_activation",
    "selection_kl",
    "swap_activations",
]
