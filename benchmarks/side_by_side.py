"""Train many independent small models side by side in one LightningModule and one Trainer.

Used by the reproduction benchmarks to replace hundreds of tiny Trainer runs. Members share
nothing but the batches: their parameters are disjoint and the loss is the sum of their losses,
so Adam (per-parameter, scale-invariant) steps each member as if it trained alone on the same
batches. Gumbel noise still comes from the one global generator, in member order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexact import selection_kl
from flexact.modules import FlexActModule


class SideBySide(FlexActModule):
    """Members trained together; ``forward`` stacks their outputs along dim 1.

    Args:
        members: The independent models.
        alphas: Weight α of each member's selection KL (0 for none).
        task: ``"mse"`` (outputs ``(B, 1)`` each, targets ``(B, 1)``) or ``"ce"`` (logits
            ``(B, C)`` each, class targets ``(B,)``).
        **kwargs: Passed to :class:`~flexact.modules.FlexActModule` (optimizer, flexact ...).
    """

    def __init__(self, members: nn.ModuleList, alphas: Sequence[float],
                 task: Literal["mse", "ce"], **kwargs: Any) -> None:
        # Stashed past nn.Module's attribute handling: configure_models (called by the base
        # __init__) registers it once the module is initialized.
        object.__setattr__(self, "_pending_members", members)
        self.alphas = list(alphas)
        self.task = task
        super().__init__(num_outputs=1, in_features=1, **kwargs)
        for member, alpha in zip(self.model, self.alphas, strict=True):
            for module in member.modules():
                if hasattr(module, "regularize"):
                    module.regularize = alpha > 0

    def configure_models(self) -> None:
        self.model = self.__dict__.pop("_pending_members")

    def configure_losses(self) -> None:
        self.criterion = self._loss

    def _loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if self.task == "mse":  # outputs (B, M), targets (B, 1): per-member means, summed
            return (outputs - targets).square().mean(0).sum()
        return sum(F.cross_entropy(outputs[:, m], targets) for m in range(outputs.shape[1]))

    def forward(self, x: Tensor) -> Tensor:
        outputs = [member(x) for member in self.model]
        return torch.cat(outputs, dim=1) if self.task == "mse" else torch.stack(outputs, dim=1)

    def regularizer(self) -> Tensor | None:
        terms = [alpha * selection_kl(member)
                 for member, alpha in zip(self.model, self.alphas, strict=True) if alpha > 0]
        return torch.stack(terms).sum() if terms else None
