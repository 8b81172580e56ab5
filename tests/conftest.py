"""Shared test fixtures."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

os.environ.setdefault("PL_DISABLE_FORK", "1")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture
def repo() -> Path:
    return REPO
