"""FlexAct: a layer that picks its activation among candidates with Gumbel-Softmax.

Pure PyTorch: usable from any training loop. See docs/method.md §1–2 for the equations.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flexact.errors import ConfigError
from flexact.nn.basis import basis_rows
from flexact.nn.batchnorm import batchnorm_mixture, fusable_batchnorm
from flexact.nn.footing import add_offset, standardized_mixture, standardized_weights
from flexact.nn.gumbel import gumbel_softmax
from flexact.nn.kernels import closed_form_mixture, takes_small_path
from flexact.nn.mixture import _general_mixture, apply_per_channel, channel_dim_of, mixture
from flexact.nn.norms import all_ranks_mean, gradient_norms
from flexact.nn.pruning import PruningMixin
from flexact.nn.registry import get_activation
from flexact.nn.spec import CandidateStateMixin, EvalMode, FlexActSpec, Granularity, Mode, check_tau

__all__ = ["FlexAct", "flexact_layers"]

class FlexAct(PruningMixin, CandidateStateMixin, nn.Module):
    """Activation layer that learns to pick one of several candidate activations.

    In training it outputs ``Σⱼ pⱼ σⱼ(x)`` with ``p ~ GumbelSoftmax(logits, τ)`` drawn once per
    forward call; the logits train with the weights. In eval it applies the picked activation
    (``eval_mode="argmax"``) or the noise-free softmax blend (``"expected"``).

    Each training forward also measures the mean gradient norm of every candidate with respect to
    the layer input and stores the pseudo-probabilities ``softmax(-ḡ/λ)`` (docs/method.md
    eqs. 1–2); :meth:`kl_divergence` returns ``KL(p̃ ‖ p)`` and :func:`selection_kl` sums it
    over a model.

    Args:
        spec: The layer's settings (:class:`~flexact.FlexActSpec`), a mapping of them, or a
            list of candidate names; the defaults (the paper's five candidates) if omitted.
        num_channels: Number of channels (required for ``granularity="channel"``).
        channel_dim: Dimension of the input holding the channels.
        regularize: Measure gradient norms in training forwards (turn off when α = 0 to save time).
        **settings: Fields of :class:`~flexact.FlexActSpec` that replace the spec's
            (``FlexAct(kl_lambda=0.3)``, ``FlexAct(candidates=["relu", "tanh"], tau=0.5)``).
    """

    def __init__(
        self,
        spec: FlexActSpec | Mapping[str, Any] | Sequence[str] | None = None,
        *,
        num_channels: int | None = None,
        channel_dim: int = 1,
        regularize: bool = True,
        **settings: Any,
    ) -> None:
        super().__init__()
        spec = FlexActSpec.build(spec, **settings)
        if spec.granularity == "channel" and (num_channels is None or num_channels < 1):
            raise ConfigError(
                "granularity='channel' needs num_channels (a positive int, the size of the "
                f"channel dimension); got {num_channels!r}"
            )
        self.spec = spec
        names = spec.candidates
        kwargs = spec.candidate_kwargs or {}
        self.candidate_names: tuple[str, ...] = tuple(names)
        self.candidates = nn.ModuleList(get_activation(n, **kwargs.get(n, {})) for n in names)
        self.hard = spec.hard
        self.granularity: Granularity = spec.granularity
        self.num_channels = num_channels if spec.granularity == "channel" else None
        self.channel_dim = channel_dim
        self.eval_mode: EvalMode = spec.eval_mode
        self.kl_lambda = spec.kl_lambda
        self.regularize = bool(regularize)
        self.mode: Mode = spec.mode
        self.compact_memory = spec.compact_memory
        # "auto" is raw in a bare layer; a Lightning module's head may resolve it (selection.py)
        gradient = spec.selection_gradient
        self.selection_gradient: str = "raw" if gradient == "auto" else gradient
        # Committed: the pick is final; train and eval both apply exactly the picked activation.
        self.committed = False
        self._committed_picks: Tensor | None = None
        self._committed_index: int | None = None  # per-layer pick as a Python int
        shape = (len(names),) if self.num_channels is None else (self.num_channels, len(names))
        start = torch.zeros(len(names)) if spec.prior is None else torch.tensor(spec.prior).log()
        self.logits = nn.Parameter((start - start.logsumexp(0)).expand(shape).clone())
        self.register_buffer("temperature", torch.tensor(spec.tau))
        self._set_active(None)  # every candidate live until prune()
        # Pseudo-probabilities p̃ from the last training forward; a target, never differentiated.
        self._targets: Tensor | None = None
        # Average ḡ over all ranks of torch.distributed before p̃ = softmax(-ḡ/λ), so N devices
        # with batch B measure what one device with batch N·B would. Off by default: a pure-torch
        # layer should not hide a collective in its forward (FlexActModule turns it on).
        self.sync_statistics = False

    def _apply(self, fn: Any, recurse: bool = True) -> FlexAct:
        # Keep τ in float32 when the model is cast (bf16 would round τ = 0.3 to 0.30078).
        tau = self.temperature.float()
        super()._apply(fn, recurse)
        self.temperature = tau.to(self.temperature.device)
        return self

    @property
    def tau(self) -> float:
        """The Gumbel-Softmax temperature τ (reading it synchronizes with the device)."""
        return float(self.temperature)

    @tau.setter
    def tau(self, value: float) -> None:
        self.temperature.fill_(check_tau(value))

    def probabilities(self) -> Tensor:
        """``softmax(logits)``, ``(p,)`` or ``(C, p)``, detached; pruned candidates get 0."""
        return self._scatter_live(torch.softmax(self.selection_logits().detach().float(), -1))

    def selected(self) -> list[str]:
        """The picked candidate name: one for ``"layer"``, one per channel for ``"channel"``."""
        return [self.candidate_names[i] for i in self.picks().reshape(-1).tolist()]

    def sample_weights(self) -> Tensor:
        """Live candidates' weights from GumbelSoftmax(logits, τ) (straight-through if hard)."""
        return gumbel_softmax(self.selection_logits(), self.temperature, self.hard)

    def forward(self, x: Tensor, input_weight: Tensor | None = None) -> Tensor:
        """Apply the layer.

        Args:
            x: Pre-activation ``h``.
            input_weight: Weight ``W`` of the affine map ``h = x Wᵀ + b`` in front of this layer,
                if any: the regularizer then measures gradients w.r.t. that map's input, as
                docs/method.md eq. (1) defines. Without it, gradients are taken w.r.t. ``h``.

        Returns:
            The activated tensor, shaped like ``x``.
        """
        channel_dim = self._channel_dim(x)
        if self.committed:
            return self._apply_pick(x, channel_dim)
        if not self.training:
            if self.eval_mode == "argmax":
                return self._apply_pick(x, channel_dim)
            probs = torch.softmax(self.selection_logits().detach().float(), -1)
            return mixture(x, probs.to(self.logits.dtype), self.live_candidates(), channel_dim)
        measure = self.regularize and torch.is_grad_enabled()
        weights = self._training_weights()
        save_dtype = torch.bfloat16 if self.compact_memory else None
        # The closed form measures ḡ from the values its forward computes anyway, unless the
        # norms run through an input weight (docs/method.md eq. 1): then they are measured here.
        own_norms = measure and input_weight is None
        live = self.live_candidates()
        offset = closed = None
        if self.selection_gradient == "standardized" and weights.requires_grad:
            if takes_small_path(x, own_norms, save_dtype):  # outputs, moments, mixture at once
                closed = standardized_mixture(x, weights, live, channel_dim), None
            else:
                weights, offset = standardized_weights(x, weights, live, channel_dim)
        if closed is None:
            closed = closed_form_mixture(x, weights, live, channel_dim, save_dtype, own_norms)
        norms = None if closed is None else closed[1]
        if norms is not None:
            self._targets = self._targets_from_norms(norms, x)
        elif measure:
            self._targets = self._pseudo_probabilities(x, input_weight, channel_dim)
        out = closed[0] if closed else _general_mixture(x, weights, live, channel_dim, save_dtype)
        return out if offset is None else add_offset(out, offset)

    def _channel_dim(self, x: Tensor) -> int | None:
        """The input's channel dimension (non-negative) for per-channel layers, else ``None``."""
        if self.num_channels is None:
            return None
        return channel_dim_of(x, self.num_channels, self.channel_dim)

    def forward_batchnorm(self, z: Tensor, norm: nn.Module,
                          residual: Tensor | None = None) -> Tensor:
        """``self(norm(z) + residual)``, fused in training so that ``norm(z)`` is never stored.

        After a batch norm, the layer's input is recomputed in backward from the norm's own
        input (:func:`flexact.nn.batchnorm.batchnorm_mixture`) instead of being stored: memory
        as with a ReLU, exact gradients, the same running statistics. Elsewhere (eval,
        committed, other norms or candidates, hooks, a residual of another dtype) the modules
        run one after the other.

        Args:
            z: Input of ``norm`` (channels in dimension 1).
            norm: The batch norm in front of this layer.
            residual: A tensor added to ``norm(z)`` before the activation (residual blocks).

        Returns:
            The activated tensor.
        """
        channel_dim = self._channel_dim(z)
        rows = None
        if (self.training and not self.committed and self.selection_gradient == "raw"
                and not (self._forward_hooks or self._forward_pre_hooks)  # they expect a call
                and fusable_batchnorm(z, norm, channel_dim, residual)):
            rows = basis_rows(self.live_candidates())
        if rows is not None:
            measure = self.regularize and torch.is_grad_enabled()
            out, norms = batchnorm_mixture(z, norm, residual, self._training_weights(), rows,
                                           channel_dim, measure)
            if norms is not None:
                self._targets = self._targets_from_norms(norms, z)
            return out
        x = norm(z)
        return self(x if residual is None else x + residual)

    def _training_weights(self) -> Tensor:
        """The mixture weights of a training forward: a Gumbel-Softmax sample or the blend."""
        if self.mode == "gumbel":
            return self.sample_weights()
        logits = self.selection_logits()
        return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)

    def picks(self) -> Tensor:
        """Index of the picked candidate: a 0-d tensor, or ``(C,)`` per channel.

        Fixed at :meth:`commit`, so committed training steps never read the logits back.
        """
        if self._committed_picks is not None:
            return self._committed_picks
        if self._active is None:
            return self.logits.detach().argmax(dim=-1)
        return self._active_index[self.selection_logits().detach().argmax(dim=-1)]

    @property
    def committed_index(self) -> int | None:
        """The committed pick of a per-layer FlexAct as an int (``None`` if not committed)."""
        return self._committed_index

    def _apply_pick(self, x: Tensor, channel_dim: int | None) -> Tensor:
        if channel_dim is None:
            if self._committed_index is None:
                return self.candidates[int(self.picks())](x)  # eval: one host sync
            return self.candidates[self._committed_index](x)
        return apply_per_channel(x, self.picks(), self.candidates, channel_dim)

    def gradient_norms(self, x: Tensor, input_weight: Tensor | None = None,
                       channel_dim: int | None = None) -> Tensor:
        """Batch-mean gradient norm ḡ of every candidate (docs/method.md eq. 1).

        See :func:`flexact.nn.norms.gradient_norms`; ``(p,)`` or ``(C, p)`` per channel.
        """
        return gradient_norms(self.candidates, x, input_weight, channel_dim)

    def _pseudo_probabilities(self, x: Tensor, input_weight: Tensor | None,
                              channel_dim: int | None) -> Tensor:
        norms = gradient_norms(self.live_candidates(), x, input_weight, channel_dim)
        return self._targets_from_norms(norms, x)

    def _targets_from_norms(self, g: Tensor, x: Tensor) -> Tensor:
        """``p̃ = softmax(-ḡ/λ)``, with ḡ averaged over all ranks when ``sync_statistics``."""
        if self.sync_statistics:
            g = all_ranks_mean(g, x.shape[0] if x.dim() else 1)
        return torch.softmax(g * (-1.0 / self.kl_lambda), dim=-1).to(self.logits.dtype)

    def commit(self, committed: bool = True) -> None:
        """Fix the selection: from now on train and eval apply exactly the picked activation.

        The weights then fine-tune to the pick (the logits and the regularizer stop training).
        ``commit(False)`` resumes selection.
        """
        self.committed = bool(committed)
        self._committed_picks = self._committed_index = None
        if self.committed:
            self._targets = None
            # The logits get no gradient from here on: read the pick once, not every step.
            self._committed_picks = self.picks()
            if self.num_channels is None:
                self._committed_index = int(self._committed_picks)

    def kl_divergence(self) -> Tensor:
        """``KL(p̃ ‖ p)`` between the last measured pseudo-probabilities and ``softmax(logits)``.

        Averaged over channels for ``granularity="channel"``; zero before any training forward
        and once the layer is committed. Only the logits receive gradient.
        """
        if self._targets is None or self.committed:
            return self.logits.new_zeros(())
        target = self._targets
        log_p = torch.log_softmax(self.selection_logits(), dim=-1)
        kl = (torch.special.xlogy(target, target) - target * log_p).sum(dim=-1)
        return kl.mean()

    def extra_repr(self) -> str:
        extra = f", num_channels={self.num_channels}" if self.num_channels is not None else ""
        return (
            f"candidates={list(self.candidate_names)}, granularity={self.granularity!r}{extra}, "
            f"hard={self.hard}, eval_mode={self.eval_mode!r}, kl_lambda={self.kl_lambda}, "
            f"mode={self.mode!r}, selection_gradient={self.selection_gradient!r}"
        )


def flexact_layers(model: nn.Module) -> Iterator[tuple[str, FlexAct]]:
    """Yield ``(qualified name, layer)`` for every :class:`FlexAct` inside ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FlexAct):
            yield name, module
