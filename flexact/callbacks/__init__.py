"""Lightning callbacks: τ annealing, selection logging and committing, failure and resume safety."""

from flexact.callbacks.checkpoint import RunCheckpoint
from flexact.callbacks.commit import SelectionCommit
from flexact.callbacks.finite_guard import FiniteGuard, NonFiniteLossError
from flexact.callbacks.rng import RNGState
from flexact.callbacks.selection_logger import SelectionLogger
from flexact.callbacks.selection_metrics import SelectionMetrics
from flexact.callbacks.selection_summary import selection_summary
from flexact.callbacks.temperature import TemperatureAnnealing, temperature_at

__all__ = [
    "FiniteGuard",
    "NonFiniteLossError",
    "RNGState",
    "RunCheckpoint",
    "SelectionCommit",
    "SelectionLogger",
    "SelectionMetrics",
    "TemperatureAnnealing",
    "selection_summary",
    "temperature_at",
]
