"""The pure-PyTorch core of flexact: no Lightning import, usable from any training loop.

One concept per module:

- :mod:`~flexact.nn.registry`: the candidate registry, one :class:`Candidate` spec per name;
  :mod:`~flexact.nn.activations`: the built-in candidates registered with their closed forms.
- :mod:`~flexact.nn.spec`: :class:`FlexActSpec`, a FlexAct layer's settings, checked once.
- :mod:`~flexact.nn.layer`: :class:`FlexAct`; :mod:`~flexact.nn.head`: :class:`FlexActHead`;
  :mod:`~flexact.nn.network`: :class:`FlexActNetwork` (backbone + head, what is exported).
- :mod:`~flexact.nn.norms`: the gradient norms ḡ; :mod:`~flexact.nn.regularizer`:
  :func:`selection_kl`.
- :mod:`~flexact.nn.mixture`, :mod:`~flexact.nn.kernels`, :mod:`~flexact.nn.basis`,
  :mod:`~flexact.nn.batchnorm`, :mod:`~flexact.nn.ops`, :mod:`~flexact.nn.gumbel`: the
  candidate mixture and its closed-form and batch-norm-fused kernels.
- :mod:`~flexact.nn.surgery`: FlexAct at every activation site, and freezing to plain modules.
"""

from flexact.nn.activations import PAPER_CANDIDATES
from flexact.nn.head import FlexActHead
from flexact.nn.layer import FlexAct, flexact_layers
from flexact.nn.mixture import mixture
from flexact.nn.network import FlexActNetwork
from flexact.nn.registry import (
    Candidate,
    available_activations,
    get_activation,
    register_activation,
)
from flexact.nn.regularizer import selection_kl
from flexact.nn.spec import FlexActSpec
from flexact.nn.surgery import freeze_selection, share_selection, swap_activations

__all__ = [
    "PAPER_CANDIDATES",
    "Candidate",
    "FlexAct",
    "FlexActHead",
    "FlexActNetwork",
    "FlexActSpec",
    "available_activations",
    "flexact_layers",
    "freeze_selection",
    "get_activation",
    "mixture",
    "register_activation",
    "selection_kl",
    "share_selection",
    "swap_activations",
]
