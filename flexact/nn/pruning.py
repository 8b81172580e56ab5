"""Pruning a FlexAct layer's candidates: the ones it will not pick leave the mixture for good.

A pruned candidate's logit is left out of the Gumbel-Softmax, of the regularizer and of the
mixture, so a layer with k live candidates costs what a k-candidate layer costs; a pruned
candidate never comes back (its probability is 0 from then on). The live set is saved in the
state dict (as extra state, next to the candidate names), so a resumed run prunes alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flexact.errors import ConfigError

__all__ = ["PruningMixin"]


class PruningMixin:
    """The live candidates of a FlexAct layer (all of them until :meth:`prune`)."""

    candidate_names: tuple[str, ...]
    candidates: nn.ModuleList
    logits: nn.Parameter
    _active: tuple[int, ...] | None = None  # None: every candidate is live

    @property
    def live_names(self) -> tuple[str, ...]:
        """Names of the candidates still in the selection."""
        return self.candidate_names if self._active is None else tuple(
            self.candidate_names[i] for i in self._active)

    def live_candidates(self) -> Sequence[nn.Module]:
        """The candidate modules still in the selection."""
        return self.candidates if self._active is None else [self.candidates[i]
                                                             for i in self._active]

    def selection_logits(self) -> Tensor:
        """The live candidates' logits, ``(k,)`` or ``(C, k)`` (a differentiable view)."""
        if self._active is None:
            return self.logits
        return self.logits.index_select(-1, self._active_index)  # type: ignore[attr-defined]

    def _scatter_live(self, live: Tensor) -> Tensor:
        """Values of the live candidates placed back at their indices, zeros elsewhere."""
        if self._active is None:
            return live
        full = live.new_zeros((*live.shape[:-1], len(self.candidate_names)))
        return full.index_copy_(-1, self._active_index, live)  # type: ignore[attr-defined]

    def prune(self, below: float) -> list[str]:
        """Drop the live candidates whose selection probability is below ``below``.

        For per-channel layers a candidate is dropped when it is below in every channel. The
        most probable candidate always stays. Reads the probabilities once (a host sync).

        Returns:
            The names dropped now.
        """
        if not 0.0 <= below < 1.0:
            raise ConfigError(f"prune threshold must lie in [0, 1), got {below!r}")
        live = torch.softmax(self.selection_logits().detach().float(), dim=-1)
        best = live.reshape(-1, live.shape[-1]).max(dim=0).values.cpu().tolist()
        low = [self.candidate_names[i] for i, p in zip(self._live_indices(), best, strict=True)
               if p < below]
        if len(low) == len(best):  # the most probable stays
            low.remove(self.candidate_names[self._live_indices()[best.index(max(best))]])
        self.drop(low)
        return low

    def drop(self, names: Sequence[str]) -> None:
        """Remove these candidates from the selection for good (at least one stays live).

        Raises:
            ConfigError: For a name that is not a live candidate, or if none would stay.
        """
        unknown = sorted(set(names) - set(self.live_names))
        if unknown:
            raise ConfigError(f"cannot drop {unknown}: the live candidates are "
                              f"{list(self.live_names)}")
        keep = tuple(i for i in self._live_indices() if self.candidate_names[i] not in names)
        if not keep:
            raise ConfigError("cannot drop every candidate: at least one must stay")
        if len(keep) < len(self._live_indices()):
            self._set_active(keep)

    def _live_indices(self) -> tuple[int, ...]:
        return tuple(range(len(self.candidate_names))) if self._active is None else self._active

    def _set_active(self, active: tuple[int, ...] | None) -> None:
        if active is not None and len(active) == len(self.candidate_names):
            active = None
        self._active = active
        self._targets = None  # measured over the previous live set
        index = torch.tensor(active or (), dtype=torch.long, device=self.logits.device)
        self.register_buffer("_active_index", index, persistent=False)  # type: ignore[attr-defined]

    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()  # type: ignore[misc]
        if self._active is not None:
            state["live"] = list(self.live_names)
        return state

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)  # type: ignore[misc]
        live = state.get("live") if isinstance(state, Mapping) else None
        self._set_active(None if live is None else tuple(
            self.candidate_names.index(name) for name in live))
