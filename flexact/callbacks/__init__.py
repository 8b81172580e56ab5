"""Lightning callbacks: temperature annealing, selection logging and committing."""

from flexact.callbacks.commit import SelectionCommit
from flexact.callbacks.selection_logger import SelectionLogger, selection_summary
from flexact.callbacks.temperature import TemperatureAnnealing, temperature_at

__all__ = [
    "SelectionCommit",
    "SelectionLogger", "TemperatureAnnealing", "selection_summary", "temperature_at"]
