"""Trying one candidate: FlexAct layers that apply exactly one of their candidates for a while.

A check of a pick (``SelectionCommit(verify=True)``) compares the network's per-sample errors
with each candidate applied alone, with the weights as they are: :func:`applying` sets the
layers as a commit to that candidate would and restores them afterwards, logits and live set
untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from flexact.errors import ConfigError
from flexact.nn.layer import FlexAct

__all__ = ["applying"]


@contextmanager
def applying(layers: Sequence[FlexAct], candidate: str) -> Iterator[None]:
    """Within the block, every layer in ``layers`` applies exactly ``candidate``.

    Args:
        layers: Per-layer FlexAct layers (``granularity: layer``) that have the candidate.
        candidate: The candidate's name.

    Raises:
        ConfigError: For a per-channel layer, or a layer without that candidate.
    """
    saved = [(layer.committed, layer._committed_picks, layer._committed_index)
             for layer in layers]
    try:
        for layer in layers:
            if layer.num_channels is not None or candidate not in layer.candidate_names:
                raise ConfigError(f"cannot apply {candidate!r} alone in {layer!r}: a per-layer "
                                  f"FlexAct with that candidate is needed")
            index = layer.candidate_names.index(candidate)
            layer.committed = True
            layer._committed_index = index
            layer._committed_picks = torch.tensor(index, device=layer.logits.device)
        yield
    finally:
        for layer, (committed, picks, index) in zip(layers, saved, strict=True):
            layer.committed, layer._committed_picks, layer._committed_index = (
                committed, picks, index)
