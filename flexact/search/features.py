"""Probe features of every function of a search space, for the surrogate samplers."""

from __future__ import annotations

import numpy as np

from flexact.nn.registry import get_activation
from flexact.probe.fisher import output_distribution
from flexact.probe.surrogate import standardize_blocks

__all__ = ["MAX_FISHER", "space_features"]

MAX_FISHER = 600
"""Spaces up to this size also get the Fisher spectrum (about 0.05–1 s a function); larger
ones use the output distribution alone."""


def space_features(task: object, names: list[str]) -> np.ndarray:
    """Standardized features of ``names``.

    ``task`` is a :class:`~flexact.cli.probe_engine.ProbeTask`; its model gives the spectra.
    """
    outputs = np.stack([output_distribution(get_activation(n)).numpy() for n in names])
    if len(names) > MAX_FISHER:
        return standardize_blocks([outputs])
    spectra = np.stack([task.spectrum(n, 24).reshape(-1) for n in names])  # type: ignore
    return standardize_blocks([outputs, spectra])
