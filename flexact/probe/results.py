"""The results database: measured metrics of trained candidates, per task, in sqlite.

Every ``flexact probe --train_top K`` run records what it trained here, so the surrogate of the
next probe on the same task starts from more measurements. A task is identified by a key of the
config's model and data sections (:func:`flexact.cli.probe.task_key`); one row per task and
canonical expression, the latest measurement winning. The file is an ordinary sqlite database
(``sqlite3 results.sqlite 'select * from results'``); writes are transactions, so an interrupted
run never leaves half a row.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from flexact.errors import ConfigError

__all__ = ["Measurement", "ResultsDB"]

_SCHEMA = """
create table if not exists results (
    task text not null,
    canonical text not null,
    candidate text not null,
    metric text not null,
    value real not null,
    higher_is_better integer not null,
    steps integer,
    seconds real,
    recorded real not null,
    primary key (task, canonical)
)
"""


@dataclass(frozen=True)
class Measurement:
    """One trained candidate's result."""

    candidate: str
    canonical: str
    metric: str
    value: float
    higher_is_better: bool
    steps: int | None = None
    seconds: float | None = None


class ResultsDB:
    """An sqlite file of measurements.

    Args:
        path: The database file (created with its folder if missing).

    Raises:
        ConfigError: If the file cannot be opened as an sqlite database.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute(_SCHEMA)
        except (sqlite3.DatabaseError, OSError) as err:
            raise ConfigError(f"cannot open the results database {str(self.path)!r}: {err}; "
                              "pass another file with --db") from None

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def record(self, task: str, measurement: Measurement) -> None:
        """Store a measurement (replacing an older one of the same task and function)."""
        m = measurement
        with self._connect() as db:
            db.execute("insert or replace into results values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (task, m.canonical, m.candidate, m.metric, float(m.value),
                        int(m.higher_is_better), m.steps, m.seconds, time.time()))

    def measurements(self, task: str) -> dict[str, Measurement]:
        """The task's measurements by canonical form."""
        with self._connect() as db:
            rows = db.execute("select candidate, canonical, metric, value, higher_is_better, "
                              "steps, seconds from results where task = ?", (task,)).fetchall()
        return {r[1]: Measurement(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6]) for r in rows}
