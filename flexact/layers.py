"""FlexAct: a layer that picks its activation among candidates with Gumbel-Softmax.

Pure PyTorch: usable from any training loop. See METHOD.md §1–2 for the equations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flexact.activations import (
    PAPER_CANDIDATES,
    activation_derivative,
    activation_value_and_derivative,
    check_activation_name,
    get_activation,
    has_parameters,
)
from flexact.errors import ConfigError
from flexact.kernels import (
    _column,
    basis_rows,
    batchnorm_mixture,
    closed_form_mixture,
    fusable_batchnorm,
)

__all__ = ["FlexAct", "FlexActHead", "flexact_layers", "mixture", "selection_kl"]

Granularity = Literal["layer", "channel"]
EvalMode = Literal["argmax", "expected"]
Mode = Literal["gumbel", "blend"]

_U_MIN = torch.finfo(torch.float32).tiny
_U_MAX = 1.0 - torch.finfo(torch.float32).eps


def _reduce_to_weight(t: Tensor, channel_dim: int | None) -> Tensor:
    """Sum ``t`` over everything but the channel dimension (in float32 for accuracy)."""
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    if channel_dim is None:
        return t.sum()
    dims = [d for d in range(t.dim()) if d != channel_dim]
    return t.sum(dim=dims)


class _FusedMixture(torch.autograd.Function):
    """Σⱼ wⱼ σⱼ(x) for parameter-free σⱼ, saving only ``x`` and ``w`` for backward.

    Backward recomputes each candidate and its derivative, so memory does not grow with the
    number of candidates (a plain autograd sum would keep one output per candidate alive).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weights: Tensor,
        candidates: Sequence[nn.Module],
        channel_dim: int | None,
        save_dtype: torch.dtype | None,
    ) -> Tensor:
        ctx.candidates = candidates
        ctx.channel_dim = channel_dim
        ctx.input_dtype = x.dtype
        compact = save_dtype is not None and save_dtype != x.dtype
        ctx.save_for_backward(x.to(save_dtype) if compact else x, weights)
        out = candidates[0](x) * _column(weights, 0, x, channel_dim)
        for j in range(1, len(candidates)):
            out.add_(candidates[j](x) * _column(weights, j, x, channel_dim))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weights = ctx.saved_tensors
        x = x.to(ctx.input_dtype)
        candidates, channel_dim = ctx.candidates, ctx.channel_dim
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        slope: Tensor | None = None
        columns = []
        # One evaluation per candidate serves both gradients (σ' from σ for sigmoid and tanh).
        for j, act in enumerate(candidates):
            value, derivative = activation_value_and_derivative(act, x)
            if need_x:
                term = derivative.mul_(_column(weights, j, x, channel_dim))
                slope = term if slope is None else slope.add_(term)
            if need_w:
                columns.append(_reduce_to_weight(value.mul_(grad_out), channel_dim))
        grad_x = grad_out * slope if need_x and slope is not None else None
        grad_w = torch.stack(columns, dim=-1).to(weights.dtype) if need_w else None
        return grad_x, grad_w, None, None, None


def mixture(
    x: Tensor,
    weights: Tensor,
    candidates: Sequence[nn.Module],
    channel_dim: int | None = None,
    save_dtype: torch.dtype | None = None,
) -> Tensor:
    """Convex combination ``Σⱼ wⱼ σⱼ(x)`` of candidate activations.

    Built-in candidates (ReLU, LeakyReLU, Identity, Sigmoid, Tanh) take a closed form that
    evaluates each shared basis function once (:mod:`flexact.kernels`); other parameter-free
    candidates go through a memory-saving custom autograd function; candidates with their own
    parameters take the general autograd path.

    Args:
        x: Input tensor.
        weights: ``(p,)`` mixture weights, or ``(C, p)`` per channel when ``channel_dim`` is set.
        candidates: The ``p`` element-wise activation modules.
        channel_dim: Dimension of ``x`` indexed by the rows of a 2-D ``weights``.
        save_dtype: Keep the input for backward in this dtype (e.g. ``torch.bfloat16`` halves
            the memory of a float32 input; gradients are then evaluated at the rounded input).

    Returns:
        A tensor shaped like ``x``.
    """
    if channel_dim is not None:
        channel_dim = channel_dim % x.dim()
    closed = closed_form_mixture(x, weights, candidates, channel_dim, save_dtype)
    if closed is not None:
        return closed[0]
    return _general_mixture(x, weights, candidates, channel_dim, save_dtype)


def _general_mixture(
    x: Tensor,
    weights: Tensor,
    candidates: Sequence[nn.Module],
    channel_dim: int | None,
    save_dtype: torch.dtype | None,
) -> Tensor:
    """:func:`mixture` for candidates without a closed form (``channel_dim`` non-negative)."""
    free = [j for j, act in enumerate(candidates) if not has_parameters(act)]
    learned = [j for j in range(len(candidates)) if j not in free]
    out: Tensor | None = None
    if free:
        sub_weights = weights if len(free) == len(candidates) else weights[..., free]
        out = _FusedMixture.apply(x, sub_weights, [candidates[j] for j in free], channel_dim,
                                  save_dtype)
    for j in learned:
        term = candidates[j](x) * _column(weights, j, x, channel_dim)
        out = term if out is None else out + term
    assert out is not None
    return out


class FlexAct(nn.Module):
    """Activation layer that learns to pick one of several candidate activations.

    In training it outputs ``Σⱼ pⱼ σⱼ(x)`` with ``p ~ GumbelSoftmax(logits, τ)`` drawn once per
    forward call; the logits train with the weights. In eval it applies the picked activation
    (``eval_mode="argmax"``) or the noise-free softmax blend (``"expected"``).

    Each training forward also measures the mean gradient norm of every candidate with respect to
    the layer input and stores the pseudo-probabilities ``softmax(-ḡ/λ)`` (METHOD.md eqs. 1–2);
    :meth:`kl_divergence` returns ``KL(p̃ ‖ p)`` and :func:`selection_kl` sums it over a model.

    Args:
        candidates: Registry names of the candidate activations (no duplicates).
        tau: Gumbel-Softmax temperature τ > 0; settable later via the ``tau`` attribute.
        hard: Straight-through: the forward weights are exactly one-hot, gradients those of the
            soft sample.
        granularity: ``"layer"``: one logit vector; ``"channel"``: one per channel.
        num_channels: Number of channels (required for ``granularity="channel"``).
        channel_dim: Dimension of the input holding the channels.
        eval_mode: ``"argmax"``: exactly the picked activation in eval; ``"expected"``: the
            softmax-weighted blend without noise.
        prior: Optional initial selection probabilities, one positive value per candidate
            (normalized here); uniform if omitted.
        kl_lambda: The regularizer's scale λ > 0 in ``softmax(-ḡ/λ)``.
        regularize: Measure gradient norms in training forwards (turn off when α = 0 to save time).
        candidate_kwargs: Keyword arguments per candidate name, e.g.
            ``{"leaky_relu": {"negative_slope": 0.2}}``.
        mode: ``"gumbel"``: FlexAct's Gumbel-Softmax sample in training; ``"blend"``: the
            noise-free softmax blend (Manessi & Rozza 2018), a baseline without a discrete pick
            (pair it with ``eval_mode="expected"``).
        compact_memory: Keep the layer input for backward in bfloat16 (float32 models): the
            extra memory over a ReLU network halves, at the cost of evaluating gradients at the
            rounded input (relative error ≤ 2⁻⁸). Useful with FlexAct at every layer.
    """

    def __init__(
        self,
        candidates: Sequence[str] = PAPER_CANDIDATES,
        tau: float = 1.0,
        hard: bool = False,
        granularity: Granularity = "layer",
        num_channels: int | None = None,
        channel_dim: int = 1,
        eval_mode: EvalMode = "argmax",
        prior: Sequence[float] | None = None,
        kl_lambda: float = 1.0,
        regularize: bool = True,
        candidate_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        mode: Mode = "gumbel",
        compact_memory: bool = False,
    ) -> None:
        super().__init__()
        names = _check_candidates(candidates)
        if mode not in ("gumbel", "blend"):
            raise ConfigError(f"mode must be 'gumbel' or 'blend', got {mode!r}")
        if granularity not in ("layer", "channel"):
            raise ConfigError(f"granularity must be 'layer' or 'channel', got {granularity!r}")
        if eval_mode not in ("argmax", "expected"):
            raise ConfigError(f"eval_mode must be 'argmax' or 'expected', got {eval_mode!r}")
        if granularity == "channel" and (num_channels is None or num_channels < 1):
            raise ConfigError(
                "granularity='channel' needs num_channels (a positive int, the size of the "
                f"channel dimension); got {num_channels!r}"
            )
        if not (isinstance(kl_lambda, (int, float)) and math.isfinite(kl_lambda) and kl_lambda > 0):
            raise ConfigError(f"kl_lambda must be a finite number > 0, got {kl_lambda!r}")
        candidate_kwargs = dict(candidate_kwargs or {})
        unknown = sorted(set(candidate_kwargs) - set(names))
        if unknown:
            raise ConfigError(
                f"candidate_kwargs names {unknown} that are not among the candidates {names}"
            )
        self.candidate_names: tuple[str, ...] = names
        self.candidates = nn.ModuleList(
            get_activation(n, **candidate_kwargs.get(n, {})) for n in names
        )
        self.hard = bool(hard)
        self.granularity: Granularity = granularity
        self.num_channels = num_channels if granularity == "channel" else None
        self.channel_dim = channel_dim
        self.eval_mode: EvalMode = eval_mode
        self.kl_lambda = float(kl_lambda)
        self.regularize = bool(regularize)
        self.mode: Mode = mode
        self.compact_memory = bool(compact_memory)
        # Committed: the pick is final; train and eval both apply exactly the picked activation.
        self.committed = False
        self._committed_picks: Tensor | None = None
        self._committed_index: int | None = None  # per-layer pick as a Python int
        shape = (len(names),) if self.num_channels is None else (self.num_channels, len(names))
        self.logits = nn.Parameter(_prior_logits(prior, len(names)).expand(shape).clone())
        self.register_buffer("temperature", torch.tensor(_check_tau(tau)))
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
        self.temperature.fill_(_check_tau(value))

    def probabilities(self) -> Tensor:
        """Selection probabilities ``softmax(logits)``: ``(p,)`` or ``(C, p)``, detached."""
        return torch.softmax(self.logits.detach().float(), dim=-1)

    def selected(self) -> list[str]:
        """The picked candidate name: one for ``"layer"``, one per channel for ``"channel"``."""
        picks = self.logits.detach().argmax(dim=-1).reshape(-1).tolist()
        return [self.candidate_names[i] for i in picks]

    def sample_weights(self) -> Tensor:
        """Draw mixture weights from GumbelSoftmax(logits, τ) (straight-through if ``hard``).

        The noise is sampled in float32 from clamped uniforms on the logits' device, so it is
        finite for every τ > 0, never synchronizes with the host, and ignores autocast.
        """
        logits = self.logits
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            u = torch.rand(logits.shape, device=logits.device, dtype=torch.float32)
            gumbel = -torch.log(-torch.log(u.clamp_(_U_MIN, _U_MAX)))
            scores = (logits.to(dtype) + gumbel.to(dtype)) / self.temperature.to(dtype)
            soft = torch.softmax(scores, dim=-1)
        if not self.hard:
            return soft
        one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
        # (soft - soft.detach()) is exactly zero, so the forward weights are exactly one-hot.
        return one_hot + (soft - soft.detach())

    def forward(self, x: Tensor, input_weight: Tensor | None = None) -> Tensor:
        """Apply the layer.

        Args:
            x: Pre-activation ``h``.
            input_weight: Weight ``W`` of the affine map ``h = x Wᵀ + b`` in front of this layer,
                if any: the regularizer then measures gradients w.r.t. that map's input, as
                METHOD.md eq. (1) defines. Without it, gradients are taken w.r.t. ``h``.

        Returns:
            The activated tensor, shaped like ``x``.
        """
        channel_dim = self._channel_dim(x)
        if self.committed:
            return self._apply_pick(x, channel_dim)
        if not self.training:
            if self.eval_mode == "argmax":
                return self._apply_pick(x, channel_dim)
            return mixture(x, self.probabilities().to(self.logits.dtype), self.candidates,
                           channel_dim)
        measure = self.regularize and torch.is_grad_enabled()
        weights = self._training_weights()
        save_dtype = torch.bfloat16 if self.compact_memory else None
        # The closed form measures ḡ from the values its forward computes anyway, unless the
        # norms run through an input weight (METHOD.md eq. 1): then they are measured here.
        own_norms = measure and input_weight is None
        closed = closed_form_mixture(x, weights, self.candidates, channel_dim, save_dtype,
                                     want_norms=own_norms)
        norms = None if closed is None else closed[1]
        if norms is not None:
            self._targets = self._targets_from_norms(norms, x)
        elif measure:
            self._targets = self._pseudo_probabilities(x, input_weight, channel_dim)
        if closed is None:
            return _general_mixture(x, weights, self.candidates, channel_dim, save_dtype)
        return closed[0]

    def _channel_dim(self, x: Tensor) -> int | None:
        """The input's channel dimension (non-negative) for per-channel layers, else ``None``."""
        if self.num_channels is None:
            return None
        if (x.dim() < 2 or not -x.dim() <= self.channel_dim < x.dim()
                or self.channel_dim % x.dim() == 0):
            raise ValueError(
                f"FlexAct channel_dim={self.channel_dim} is not a non-batch dimension of the "
                f"input of shape {tuple(x.shape)}"
            )
        channel_dim = self.channel_dim % x.dim()
        if x.shape[channel_dim] != self.num_channels:
            raise ValueError(
                f"FlexAct expected {self.num_channels} channels in dim {self.channel_dim}, "
                f"got input of shape {tuple(x.shape)}"
            )
        return channel_dim

    def forward_batchnorm(self, z: Tensor, norm: nn.Module,
                          residual: Tensor | None = None) -> Tensor:
        """``self(norm(z) + residual)``, fused in training so that ``norm(z)`` is never stored.

        A FlexAct layer must keep its input for backward, one activation-sized tensor more than
        a ReLU network stores. After a batch norm that input can be recomputed from the batch
        norm's own input instead (:func:`flexact.kernels.batchnorm_mixture`): memory as with a
        ReLU, exact gradients, the same running statistics. Falls back to the modules one after
        the other wherever that does not apply (eval, committed, other norms or candidates,
        forward hooks on either module, a residual of another dtype).

        Args:
            z: Input of ``norm`` (channels in dimension 1).
            norm: The batch norm in front of this layer.
            residual: A tensor added to ``norm(z)`` before the activation (residual blocks).

        Returns:
            The activated tensor.
        """
        channel_dim = self._channel_dim(z)
        rows = None
        if (self.training and not self.committed
                and not (self._forward_hooks or self._forward_pre_hooks)  # they expect a call
                and fusable_batchnorm(z, norm, channel_dim, residual)):
            rows = basis_rows(self.candidates)
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
        return torch.softmax(
            self.logits.to(torch.promote_types(self.logits.dtype, torch.float32)), dim=-1)

    def picks(self) -> Tensor:
        """Index of the picked candidate: a 0-d tensor, or ``(C,)`` per channel.

        Fixed at :meth:`commit`, so committed training steps never read the logits back.
        """
        if self._committed_picks is not None:
            return self._committed_picks
        return self.logits.detach().argmax(dim=-1)

    @property
    def committed_index(self) -> int | None:
        """The committed pick of a per-layer FlexAct as an int (``None`` if not committed)."""
        return self._committed_index

    def _apply_pick(self, x: Tensor, channel_dim: int | None) -> Tensor:
        if channel_dim is None:
            if self._committed_index is None:
                return self.candidates[int(self.picks())](x)  # eval: one host sync
            return self.candidates[self._committed_index](x)
        picks = self.picks()
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        picks = picks.reshape(shape)
        out = torch.empty_like(x)
        for j, act in enumerate(self.candidates):
            out = torch.where(picks == j, act(x), out)
        return out

    @torch.no_grad()
    def gradient_norms(
        self, x: Tensor, input_weight: Tensor | None = None, channel_dim: int | None = None
    ) -> Tensor:
        """Batch-mean gradient norm ḡ of every candidate (METHOD.md eq. 1).

        Args:
            x: Pre-activation ``h`` (first dimension is the batch).
            input_weight: ``W`` of the affine map that produced ``h`` (see :meth:`forward`).
            channel_dim: Channel dimension for per-channel norms, or ``None`` for per-layer.

        Returns:
            ``(p,)`` for a per-layer layer, ``(C, p)`` per channel.
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        h = x.detach().to(dtype)
        if h.dim() == 1:
            h = h.unsqueeze(-1)
        w = None if input_weight is None else input_weight.detach().to(dtype)
        norms = []
        derivatives = []
        for act in self.candidates:
            param = next(act.parameters(), None)
            if param is None or param.dtype == dtype:
                d = activation_derivative(act, h)
            else:  # differentiate a parameterized candidate in its own dtype
                d = activation_derivative(act, h.to(param.dtype)).to(dtype)
            if channel_dim is None and w is not None:
                derivatives.append(d)  # all candidates in one product below
                continue
            if channel_dim is None:
                g = d.flatten(1).norm(dim=1)
            elif w is not None:
                g = d.abs() * w.norm(dim=1)  # channel c depends on x through row c of W
            else:
                g = d.movedim(channel_dim, 1).reshape(d.shape[0], d.shape[channel_dim], -1)
                g = g.norm(dim=2)
            norms.append(g.mean() if channel_dim is None else g.reshape(-1, g.shape[-1]).mean(0))
        if derivatives:  # ∇ₓ Σₒ σ(hₒ) = σ'(h) W per sample, for every candidate at once
            assert w is not None
            with torch.autocast(device_type=h.device.type, enabled=False):  # keep float32
                products = torch.matmul(torch.stack(derivatives), w)  # (p, ..., in)
            return products.norm(dim=-1).flatten(1).mean(1)
        return torch.stack(norms, dim=-1)

    def _pseudo_probabilities(
        self, x: Tensor, input_weight: Tensor | None, channel_dim: int | None
    ) -> Tensor:
        return self._targets_from_norms(self.gradient_norms(x, input_weight, channel_dim), x)

    def _targets_from_norms(self, g: Tensor, x: Tensor) -> Tensor:
        """``p̃ = softmax(-ḡ/λ)``, with ḡ averaged over all ranks when ``sync_statistics``."""
        if self.sync_statistics:
            g = _all_ranks_mean(g, x.shape[0] if x.dim() else 1)
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
            self._committed_picks = self.logits.detach().argmax(dim=-1)
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
        log_p = torch.log_softmax(self.logits, dim=-1)
        kl = (torch.special.xlogy(target, target) - target * log_p).sum(dim=-1)
        return kl.mean()

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        """Candidate names, stored in the state dict so a checkpoint is checked on load."""
        return {"candidates": list(self.candidate_names)}

    def set_extra_state(self, state: Any) -> None:
        """Check that a loaded state dict was saved with the same candidates, in the same order.

        Raises:
            ConfigError: If the saved candidates differ from this layer's.
        """
        saved = state.get("candidates") if isinstance(state, Mapping) else None
        if saved is None:
            return
        if tuple(saved) != self.candidate_names:
            raise ConfigError(
                f"the checkpoint was trained with candidates {list(saved)}, but the model is "
                f"configured with {list(self.candidate_names)}; configure the same candidates "
                "(same names, same order) as the run that wrote the checkpoint"
            )

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # torch raises set_extra_state's ConfigError at once, ahead of the size-mismatch
        # errors it collects; here it gets the layer's name. Checkpoints written before the
        # extra state existed lack the key: they load as before instead of failing strictly.
        missing_keys: list[str] = args[2] if len(args) > 2 else kwargs["missing_keys"]
        key = prefix + "_extra_state"
        had_key = key in state_dict
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        except ConfigError as err:
            raise ConfigError(f"FlexAct layer '{prefix[:-1] or 'root'}': {err}") from None
        if not had_key and key in missing_keys:
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        extra = f", num_channels={self.num_channels}" if self.num_channels is not None else ""
        return (
            f"candidates={list(self.candidate_names)}, granularity={self.granularity!r}{extra}, "
            f"hard={self.hard}, eval_mode={self.eval_mode!r}, kl_lambda={self.kl_lambda}, "
            f"mode={self.mode!r}"
        )


def _all_ranks_mean(g: Tensor, count: int) -> Tensor:
    """Mean of ``g`` over all ranks of torch.distributed, weighted by each rank's ``count``.

    Returns ``g`` unchanged outside a multi-process group. Every rank must call it (it is a
    collective): all ranks run the same training forwards under DDP.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return g
    # One all-reduce of [count·g, count]: equal to the global batch mean also for uneven batches.
    packed = torch.cat([g.flatten() * count, g.new_full((1,), float(count))])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return (packed[:-1] / packed[-1]).reshape(g.shape)


def _check_candidates(candidates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(candidates, str):
        raise ConfigError(f"candidates must be a list of names, got the string {candidates!r}")
    names = tuple(candidates)
    if not names:
        raise ConfigError("candidates is empty; give at least one activation name")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"duplicate candidates {duplicates}; list each activation once")
    for name in names:
        check_activation_name(name)
    return names


def _check_tau(tau: float) -> float:
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ConfigError(f"tau must be a number > 0, got {tau!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"tau must be a finite number > 0, got {tau!r}")
    return value


def _prior_logits(prior: Sequence[float] | None, p: int) -> Tensor:
    if prior is None:
        return torch.zeros(p)
    values = torch.as_tensor(list(prior), dtype=torch.float32)
    if values.shape != (p,) or not bool(torch.isfinite(values).all() and (values > 0).all()):
        raise ConfigError(
            f"prior must hold {p} finite positive numbers (one per candidate), got {list(prior)}"
        )
    return torch.log(values / values.sum())


class FlexActHead(nn.Module):
    """Affine map followed by FlexAct, optionally followed by a second affine map.

    Without ``hidden_features``: ``Linear(in, out) → FlexAct`` (the paper's single-layer model).
    With it: ``Linear(in, hidden) → FlexAct → Linear(hidden, out)`` (FlexAct at the penultimate
    layer, as the paper's CIFAR models). Inputs with more than two dimensions are flattened.

    Args:
        in_features: Size of each input sample.
        out_features: Size of each output sample.
        hidden_features: Width of the FlexAct layer between two affine maps, or ``None``.
        candidates: Registry names of the candidate activations.
        tau: Initial Gumbel-Softmax temperature.
        hard: Straight-through one-hot weights in the forward pass.
        granularity: ``"layer"`` or ``"channel"`` (one logit vector per feature).
        eval_mode: ``"argmax"`` or ``"expected"``.
        prior: Optional initial selection probabilities.
        kl_lambda: The regularizer's scale λ.
        regularize: Measure gradient norms for the regularizer in training.
        mode: ``"gumbel"`` (FlexAct) or ``"blend"`` (noise-free softmax blend baseline).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: int | None = None,
        candidates: Sequence[str] = PAPER_CANDIDATES,
        tau: float = 1.0,
        hard: bool = False,
        granularity: Granularity = "layer",
        eval_mode: EvalMode = "argmax",
        prior: Sequence[float] | None = None,
        kl_lambda: float = 1.0,
        regularize: bool = True,
        mode: Mode = "gumbel",
    ) -> None:
        super().__init__()
        for label, value in (("in_features", in_features), ("out_features", out_features),
                             ("hidden_features", hidden_features)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"{label} must be a positive int, got {value!r}")
        width = hidden_features or out_features
        self.linear = nn.Linear(in_features, width)
        self.flexact = FlexAct(
            candidates, tau=tau, hard=hard, granularity=granularity,
            num_channels=width if granularity == "channel" else None, channel_dim=-1,
            eval_mode=eval_mode, prior=prior, kl_lambda=kl_lambda, regularize=regularize,
            mode=mode,
        )
        self.output = nn.Linear(width, out_features) if hidden_features else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2:
            x = x.flatten(1)
        h = self.linear(x)
        if isinstance(self.flexact, FlexAct):
            h = self.flexact(h, input_weight=self.linear.weight)
        else:  # frozen by freeze_selection: a plain activation module
            h = self.flexact(h)
        return h if self.output is None else self.output(h)


def flexact_layers(model: nn.Module) -> Iterator[tuple[str, FlexAct]]:
    """Yield ``(qualified name, layer)`` for every :class:`FlexAct` inside ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FlexAct):
            yield name, module


def selection_kl(model: nn.Module, reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """``KL(p̃ ‖ p)`` over every FlexAct layer of ``model`` (METHOD.md eq. 4).

    Multiply by α and add to the task loss. Zero (a tensor) if the model has no FlexAct layer.

    Args:
        model: Any module containing FlexAct layers.
        reduction: ``"sum"`` over layers, as the paper's eq. (4), or ``"mean"`` over layers, so
            that α's pull does not grow with the number of FlexAct layers (see the teacher
            benchmark in benchmarks/RESULTS.md).
    """
    layers = [layer for _, layer in flexact_layers(model)]
    if not layers:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    terms: list[Tensor] = []
    # Layers whose logits have the same shape: one batched KL for all of them (a dozen small
    # kernels in all, instead of a dozen per layer). Subclasses that define their own
    # kl_divergence are asked one by one.
    batches: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[FlexAct]] = {}
    for layer in layers:
        if type(layer).kl_divergence is not FlexAct.kl_divergence:
            terms.append(layer.kl_divergence())
        elif layer._targets is not None and not layer.committed:  # else its KL is zero
            key = (tuple(layer.logits.shape), layer.logits.dtype, layer.logits.device)
            batches.setdefault(key, []).append(layer)
    for batch in batches.values():
        target = torch.stack([layer._targets for layer in batch])  # type: ignore[misc]
        log_p = torch.log_softmax(torch.stack([layer.logits for layer in batch]), dim=-1)
        kl = (torch.special.xlogy(target, target) - target * log_p).sum(dim=-1)
        terms.append((kl.mean(dim=-1) if kl.dim() > 1 else kl).sum())  # channels: the mean
    count = len(layers)
    if not terms:
        return layers[0].logits.new_zeros(())
    total = terms[0]
    for term in terms[1:]:  # (a Python sum: the terms may differ in dtype)
        total = total + term
    return total / count if reduction == "mean" else total
