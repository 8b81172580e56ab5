"""Shared test fixtures."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

PAPER_FIVE = ("relu", "sigmoid", "tanh", "leaky_relu", "identity")
OTHER_BUILTINS = (
    "gelu", "silu", "elu", "selu", "softplus", "mish", "prelu", "swish_beta", "adaptive_gumbel",
    "adaptive_relu", "gelu_sine", "gelu_sinc", "gmtu",
)
"""The registry's built-in names beyond the paper's five, as the issue lists them."""

os.environ.setdefault("PL_DISABLE_FORK", "1")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture
def repo() -> Path:
    return REPO
