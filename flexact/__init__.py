"""flexact: networks that pick their activation functions while they train.

The top-level package is the pure-PyTorch core (:mod:`flexact.nn`, no Lightning import): the
:class:`FlexAct` layer and its settings :class:`FlexActSpec`, :class:`FlexActHead`,
:class:`FlexActNetwork`, the bias-correcting regularizer :func:`selection_kl`, and the
candidate registry. The Lightning layer lives in ``flexact.modules``, ``flexact.callbacks``,
``flexact.datamodules`` and ``flexact.cli``; tools in ``flexact.tools``.
"""

from flexact.errors import ConfigError
from flexact.nn import (
    PAPER_CANDIDATES,
    Candidate,
    FlexAct,
    FlexActHead,
    FlexActNetwork,
    FlexActSpec,
    available_activations,
    flexact_layers,
    freeze_selection,
    get_activation,
    mixture,
    register_activation,
    selection_kl,
    swap_activations,
)

__version__ = "0.2.0"

__all__ = [
    "PAPER_CANDIDATES",
    "Candidate",
    "ConfigError",
    "FlexAct",
    "FlexActHead",
    "FlexActNetwork",
    "FlexActSpec",
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
