"""flexact: networks that pick their activation functions while they train.

The top-level package is the pure-PyTorch core (:mod:`flexact.nn`, no Lightning import): the
:class:`FlexAct` layer and its settings :class:`FlexActSpec`, :class:`FlexActHead`,
:class:`FlexActNetwork`, the bias-correcting regularizer :func:`selection_kl`, and the
candidate registry. The Lightning layer lives in ``flexact.modules``, ``flexact.callbacks``,
``flexact.datamodules`` and ``flexact.cli``; tools in ``flexact.tools``.
"""

import flexact.nn as _core
from flexact.errors import ConfigError
from flexact.nn import *  # noqa: F403 - the core's public names are the package's

__version__ = "0.2.0"

__all__ = ["ConfigError", "__version__", *_core.__all__]
