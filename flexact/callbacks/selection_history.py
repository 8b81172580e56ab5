"""``SelectionHistory``: the rows of ``selection_history.csv``, checkpointed and appended."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flexact.callbacks.selection_summary import Summary
from flexact.tools.plot import HISTORY_FIELDS, append_history, write_history

__all__ = ["SelectionHistory"]


class SelectionHistory:
    """Selection probabilities over training, one row per record, layer and candidate.

    The rows are state: :meth:`state_dict` stores them column by column (compact and loadable
    with ``torch.load(weights_only=True)``), so a resumed run continues the same history. The
    file side is not state: the first :meth:`write` of a process (or to a new path) writes the
    whole file, restored rows first; later writes append only the rows added since.

    Attributes:
        rows: ``{"step", "epoch", "layer", "candidate", "probability", "tau"}`` dicts in order.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._path: Path | None = None
        self._written = 0

    @property
    def last_step(self) -> int | None:
        """The step of the latest record, ``None`` before the first."""
        return int(self.rows[-1]["step"]) if self.rows else None

    def add(self, step: int, epoch: float, summary: Summary) -> None:
        """Append one record: a row per layer and candidate of ``summary``."""
        for layer, entry in summary.items():
            for cand, prob in zip(entry["candidates"], entry["probabilities"], strict=True):
                self.rows.append({"step": step, "epoch": epoch, "layer": layer,
                                  "candidate": cand, "probability": prob, "tau": entry["tau"]})

    def write(self, path: str | Path) -> Path:
        """Bring the CSV at ``path`` up to date: append the new rows, or write it whole.

        The whole file is written (atomically) the first time, when the path changed, or when
        the file has gone; otherwise only the rows added since the last write are appended.
        """
        path = Path(path)
        if path != self._path or not path.is_file():
            write_history(path, self.rows)
        elif len(self.rows) > self._written:
            append_history(path, self.rows[self._written:])
        self._path, self._written = path, len(self.rows)
        return path

    def forget_file(self) -> None:
        """Make the next :meth:`write` write the whole file (a new run directory)."""
        self._path, self._written = None, 0

    def state_dict(self) -> dict[str, list[Any]]:
        """The rows as columns, ``{field: [value, ...]}``."""
        return {field: [row[field] for row in self.rows] for field in HISTORY_FIELDS}

    def load_state_dict(self, state: dict[str, list[Any]]) -> None:
        """Restore the rows from :meth:`state_dict`'s columns (a missing column reads as blank)."""
        n = len(state.get("step", []))
        columns = [state.get(field, [""] * n) for field in HISTORY_FIELDS]
        self.rows = [dict(zip(HISTORY_FIELDS, values, strict=True))
                     for values in zip(*columns, strict=True)]
        self.forget_file()
