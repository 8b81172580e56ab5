"""``FlexActSpec``: the settings of a FlexAct layer, declared and checked in one place.

:class:`~flexact.FlexAct`, :class:`~flexact.FlexActHead`, :func:`~flexact.swap_activations`,
the backbones' ``activation`` argument and the Lightning modules' ``flexact`` argument all take
one spec, so a YAML config sets it once::

    model:
      init_args:
        flexact: {candidates: [relu, tanh, identity], tau: 1.0, kl_lambda: 0.3}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from flexact.errors import ConfigError
from flexact.nn.activations import PAPER_CANDIDATES
from flexact.nn.registry import check_activation_name

__all__ = ["CandidateStateMixin", "EvalMode", "FlexActSpec", "Granularity", "Mode",
           "SelectionGradient", "check_same_candidates", "check_tau"]

Granularity = Literal["layer", "channel"]
EvalMode = Literal["argmax", "expected"]
Mode = Literal["gumbel", "blend"]
SelectionGradient = Literal["auto", "raw", "standardized"]


@dataclass(frozen=True)
class FlexActSpec:
    """What a FlexAct layer picks from and how; shared by every site built from it.

    Args:
        candidates: Registry names of the candidate activations (no duplicates).
        tau: Initial Gumbel-Softmax temperature τ > 0 (a TemperatureAnnealing callback
            overrides it during training).
        hard: Straight-through: the forward weights are exactly one-hot, gradients those of the
            soft sample.
        granularity: ``layer``: one selection per layer; ``channel``: one per channel/feature.
        eval_mode: ``argmax``: exactly the picked activation in eval; ``expected``: the
            softmax-weighted blend without noise.
        prior: Initial selection probabilities, one positive value per candidate (normalized),
            or the path of a ``probe.json`` written by ``flexact probe`` (the probe's ranking:
            docs/probe.md); uniform if omitted.
        kl_lambda: Scale λ > 0 of the regularizer's pseudo-probabilities softmax(-ḡ/λ).
        mode: ``gumbel``: FlexAct's Gumbel-Softmax sample in training; ``blend``: the
            noise-free softmax blend of Manessi & Rozza (2018), a baseline without a discrete
            pick (pair it with ``eval_mode: expected``).
        compact_memory: Keep the layer input for backward in bfloat16 (float32 models): the
            extra memory over a ReLU network halves, gradients are evaluated at the rounded
            input (relative error ≤ 2⁻⁸).
        candidate_kwargs: Keyword arguments per candidate name, e.g.
            ``{leaky_relu: {negative_slope: 0.2}}``.
        candidates_file: A text file of candidate names or expressions, one per line (``#``
            comments), e.g. the ``top.txt`` of ``flexact search``; replaces ``candidates``.
        selection_gradient: ``raw``: the logits' gradient of the plain mixture; ``standardized``:
            taken against each candidate's output standardized over the batch, so that a
            candidate's scale and offset do not decide its pick (docs/method.md §5; it evaluates
            every candidate once more per training forward and skips the batch-norm fusion);
            ``auto``: standardized in a Lightning module's FlexAct head that an affine map
            follows (``hidden_features``) and that selects on its own (no ``swap_backbone``),
            raw elsewhere.
    """

    candidates: Sequence[str] = PAPER_CANDIDATES
    tau: float = 1.0
    hard: bool = False
    granularity: Granularity = "layer"
    eval_mode: EvalMode = "argmax"
    prior: Sequence[float] | str | None = None
    kl_lambda: float = 1.0
    mode: Mode = "gumbel"
    compact_memory: bool = False
    candidate_kwargs: Mapping[str, Mapping[str, Any]] | None = None
    candidates_file: str | None = None
    selection_gradient: SelectionGradient = "auto"

    def __post_init__(self) -> None:
        if self.candidates_file is not None:
            object.__setattr__(self, "candidates", _read_candidates(self.candidates_file))
        names = _check_candidates(self.candidates)
        for field, kind in (("granularity", Granularity), ("eval_mode", EvalMode),
                            ("mode", Mode), ("selection_gradient", SelectionGradient)):
            if getattr(self, field) not in get_args(kind):
                *first, last = (repr(c) for c in get_args(kind))
                choices = f"{', '.join(first)} or {last}"
                raise ConfigError(f"{field} must be {choices}, got {getattr(self, field)!r}")
        kl_lambda = self.kl_lambda
        if isinstance(kl_lambda, bool) or not (isinstance(kl_lambda, (int, float))
                                               and math.isfinite(kl_lambda) and kl_lambda > 0):
            raise ConfigError(f"kl_lambda must be a finite number > 0, got {kl_lambda!r}")
        kwargs = {str(k): dict(v) for k, v in (self.candidate_kwargs or {}).items()}
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ConfigError(
                f"candidate_kwargs names {unknown} that are not among the candidates {list(names)}"
            )
        set_ = object.__setattr__  # frozen: normalize once, here
        set_(self, "candidates", names)
        set_(self, "tau", check_tau(self.tau))
        set_(self, "kl_lambda", float(kl_lambda))
        set_(self, "prior", _check_prior(self.prior, names))
        set_(self, "candidate_kwargs", kwargs or None)

    @classmethod
    def build(cls, spec: FlexActSpec | Mapping[str, Any] | Sequence[str] | None = None,
              **settings: Any) -> FlexActSpec:
        """A spec from a spec, a mapping of its fields, or a list of candidate names.

        Args:
            spec: The base spec (``None``: the defaults).
            **settings: Fields that replace the base's (``tau=0.5``, ``candidates=[...]``).

        Raises:
            ConfigError: For a field that does not exist or a value that is not valid.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - fields)
        if isinstance(spec, Mapping):
            unknown += sorted(set(spec) - fields)
        if unknown:
            raise ConfigError(f"unknown FlexAct setting(s) {unknown}; valid settings are "
                              f"{sorted(fields)}")
        if spec is None:
            return cls(**settings)
        if isinstance(spec, Mapping):
            return cls(**{**spec, **settings})
        if not isinstance(spec, cls):
            return cls(candidates=spec, **settings)  # a list of names, as nn-style sugar
        return dataclasses.replace(spec, **settings) if settings else spec

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain lists and dicts (for hyper-parameters and YAML)."""
        return {
            "candidates": list(self.candidates),
            "tau": self.tau,
            "hard": self.hard,
            "granularity": self.granularity,
            "eval_mode": self.eval_mode,
            "prior": None if self.prior is None else list(self.prior),
            "kl_lambda": self.kl_lambda,
            "mode": self.mode,
            "compact_memory": self.compact_memory,
            "candidate_kwargs": None if self.candidate_kwargs is None else {
                k: dict(v) for k, v in self.candidate_kwargs.items()},
            "selection_gradient": self.selection_gradient,
        }


def check_tau(tau: Any, label: str = "tau") -> float:
    """``tau`` as a float if it is a finite number > 0.

    Raises:
        ConfigError: Otherwise, naming ``label``.
    """
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ConfigError(f"{label} must be a number > 0, got {tau!r}") from None
    if isinstance(tau, bool) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{label} must be a finite number > 0, got {tau!r}")
    return value


def check_same_candidates(saved: Sequence[str] | None, configured: Sequence[str],
                          source: str) -> None:
    """Refuse state trained with other candidates (or another order) than ``configured``.

    Args:
        saved: The candidates stored with the state (``None``: not recorded, accepted).
        configured: The candidates of the model being loaded.
        source: What holds the state, for the message ("the checkpoint runs/x.ckpt").

    Raises:
        ConfigError: If both are known and differ.
    """
    if saved is not None and list(saved) != list(configured):
        raise ConfigError(
            f"{source} was trained with candidates {list(saved)}, but the model is configured "
            f"with {list(configured)}; configure the same candidates (same names, same order) "
            "as the run that wrote it"
        )


def _read_candidates(path: str) -> tuple[str, ...]:
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except OSError as err:
        raise ConfigError(f"cannot read candidates_file {path!r}: {err.strerror}") from None
    names = tuple(s for line in lines if (s := line.split("#", 1)[0].strip()))
    if not names:
        raise ConfigError(f"candidates_file {path!r} lists no candidates")
    return names


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


def _check_prior(prior: Sequence[float] | str | None, names: tuple[str, ...]
                 ) -> tuple[float, ...] | None:
    if prior is None:
        return None
    p = len(names)
    if isinstance(prior, str):
        from flexact.probe.prior import prior_from_probe

        prior = prior_from_probe(prior, names)
    values = tuple(float(v) for v in prior)
    if len(values) != p or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(
            f"prior must hold {p} finite positive numbers (one per candidate), got {list(prior)}"
        )
    return values


class CandidateStateMixin:
    """Stores a layer's ``candidate_names`` in its state dict and checks them on load."""

    candidate_names: tuple[str, ...]

    def get_extra_state(self) -> dict[str, Any]:
        """Candidate names, stored in the state dict so a checkpoint is checked on load."""
        return {"candidates": list(self.candidate_names)}

    def set_extra_state(self, state: Any) -> None:
        """Check that a loaded state dict was saved with the same candidates, in the same order.

        Raises:
            ConfigError: If the saved candidates differ from this layer's.
        """
        saved = state.get("candidates") if isinstance(state, Mapping) else None
        check_same_candidates(saved, self.candidate_names, "the checkpoint")

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
