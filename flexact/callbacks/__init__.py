"""Lightning callbacks: temperature annealing and selection logging."""

from flexact.callbacks.selection_logger import SelectionLogger, selection_summary
from flexact.callbacks.temperature import TemperatureAnnealing, temperature_at

__all__ = ["SelectionLogger", "TemperatureAnnealing", "selection_summary", "temperature_at"]
