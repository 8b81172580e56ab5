"""flexact: networks that pick their activation functions while they train.

The top-level package is the pure-PyTorch core (:mod:`flexact.nn`, no Lightning import): the
:class:`FlexAct` layer and its settings :class:`FlexActSpec`, :class:`FlexActHead`,
:class:`FlexActNetwork`, the bias-correcting regularizer :func:`selection_kl`, and the
candidate registry. The Lightning layer lives in ``flexact.modules``, ``flexact.callbacks``,
``flexact.datamodules`` and ``flexact.cli``; tools in ``flexact.tools``.
"""

from typing import Any

__version__ = "0.2.0"

# The core's public names (flexact.nn.__all__), loaded on first use: `flexact --help` then needs
# no torch import.
_CORE = (
    "PAPER_CANDIDATES", "Candidate", "FlexAct", "FlexActHead", "FlexActNetwork", "FlexActSpec",
    "available_activations", "flexact_layers", "freeze_selection", "get_activation", "mixture",
    "register_activation", "selection_kl", "share_selection", "swap_activations",
)

__all__ = ["ConfigError", "__version__", *_CORE]


def __getattr__(name: str) -> Any:
    if name == "ConfigError":
        from flexact.errors import ConfigError

        return ConfigError
    if name in _CORE:
        import flexact.nn

        return getattr(flexact.nn, name)
    raise AttributeError(f"module 'flexact' has no attribute {name!r}")
