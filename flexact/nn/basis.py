"""The closed-form basis of the built-in candidates, and its constants on each device.

ReLU, LeakyReLU, Identity, Sigmoid and Tanh are all linear combinations of five basis
functions, ``relu(x)``, ``x``, ``σ(x)``, ``σ(2x)`` and ``1`` (``tanh(x) = 2σ(2x) − 1``,
``leaky_relu(x) = (1 − s)·relu(x) + s·x``). Each candidate's row of coefficients is part of
its registry spec (:class:`flexact.nn.registry.Candidate`); this module turns the rows of a
layer's candidates into the coefficient matrix ``C`` (a mixture ``Σⱼ wⱼ fⱼ`` is ``Σₖ βₖ bₖ``
with ``β = w·C``) and the factors of the candidates' squared gradient norms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flexact.nn.registry import basis_row

__all__ = ["BASIS", "basis_row", "basis_rows"]

BASIS: tuple[str, ...] = ("relu", "x", "sigmoid", "sigmoid_2x", "one")
"""The basis functions, in the column order of the coefficient matrix."""

_RELU, _X, _SIG, _SIG2, _ONE = range(len(BASIS))

# (device, dtype, rows) -> (coefficients C (p, 5), squared-norm coefficients Q (4, p), used
# bases), so that a training step never copies these small constants from the host again.
_CONSTANTS: dict[tuple[torch.device, torch.dtype, tuple[tuple[float, ...], ...]],
                 tuple[Tensor, Tensor, tuple[bool, ...]]] = {}


def basis_rows(candidates: Sequence[nn.Module]) -> tuple[tuple[float, ...], ...] | None:
    """Coefficient rows of all candidates, or ``None`` if any lacks a closed form."""
    rows = []
    for act in candidates:
        row = basis_row(act)
        if row is None:
            return None
        rows.append(row)
    return tuple(rows)


def _constants(rows: tuple[tuple[float, ...], ...], device: torch.device,
               dtype: torch.dtype) -> tuple[Tensor, Tensor, tuple[bool, ...]]:
    """``(C, Q, used)`` for these candidate rows.

    ``C`` and ``Q`` on ``device`` in ``dtype`` (float32 or float64); ``used[k]``: whether any
    candidate needs basis ``k``.
    """
    key = (device, dtype, rows)
    if key not in _CONSTANTS:
        # Never inference tensors: a first call under torch.inference_mode (a sanity-check
        # validation) must not leave constants that training cannot save for backward.
        with torch.inference_mode(False):
            coefficients, squares = _build_constants(rows)
            used = tuple(any(row[k] != 0.0 for row in rows) for k in range(len(BASIS)))
            _CONSTANTS[key] = (coefficients.to(device, dtype), squares.to(device, dtype), used)
    return _CONSTANTS[key]


def _build_constants(rows: tuple[tuple[float, ...], ...]) -> tuple[Tensor, Tensor]:
    # In float64, so that float64 models get the exact slopes (LeakyReLU's 0.01).
    coefficients = torch.tensor(rows, dtype=torch.float64)
    # A candidate's squared gradient norm over a group of n elements is
    # (c_relu + c_x)²·#(x > 0) + c_x²·#(x ≤ 0) + c_σ²·Σσ'(x)² + (2c_σ2x)²·Σσ'(2x)²: each
    # built-in row uses one kind of basis (piecewise linear, σ(x) or σ(2x)), so no cross
    # terms arise. Rows: the factors of [#(x > 0), Σσ'(x)², Σσ'(2x)²], then that of n.
    relu, ident, sig, sig2 = (coefficients[:, k] for k in (_RELU, _X, _SIG, _SIG2))
    squares = torch.stack([(relu + ident) ** 2 - ident**2, sig**2, (2 * sig2) ** 2,
                           ident**2])
    return coefficients, squares


