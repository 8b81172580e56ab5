"""Plain DDP with committed FlexAct layers: their unused parameters join the loss with weight 0.

A committed layer applies its pick only: its logits (and, per layer, the other candidates'
parameters) get no gradient, which DDP treats as an error unless it searches the graph for
unused parameters every step (``find_unused_parameters``). Adding them to the loss with weight
0 keeps plain DDP working; the module drops their (zero) gradients after backward so the
optimizer leaves them untouched, as on one device.
"""

from __future__ import annotations

from torch import nn

from flexact.nn import flexact_layers

__all__ = ["unused_selection_parameters"]


def unused_selection_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that committed FlexAct layers of ``model`` leave out of the forward."""
    unused: list[nn.Parameter] = []
    for _, layer in flexact_layers(model):
        if not layer.committed:
            continue
        unused.append(layer.logits)
        if layer.num_channels is None:  # per channel, every candidate is evaluated
            pick = layer.committed_index
            for j, candidate in enumerate(layer.candidates):
                if j != pick:
                    unused.extend(candidate.parameters())
    return [p for p in unused if p.requires_grad]
