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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel test workers (`pytest -n auto`) each get one thread, and so do the processes they
    # start: with two threads per worker on a 2-core machine, OpenMP's spin-waits for a
    # descheduled thread made the threaded tests (Fisher eigensolves, ResNets) up to 9x slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture
def repo() -> Path:
    return REPO
