"""Write a benchmark's section into ``benchmarks/RESULTS.md`` (replacing its previous run)."""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """One line naming the machine, date and software, for every recorded result."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"Machine: {platform.node() or 'unknown'}, {platform.machine()}, {os.cpu_count()} "
            f"CPU cores, torch {torch.__version__}, {gpu}. "
            f"Date: {datetime.date.today().isoformat()}.")


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def write_section(key: str, title: str, seconds: float, body: str) -> None:
    """Replace the section between ``<!-- key:start -->`` and ``<!-- key:end -->``, or append it.

    Args:
        key: Marker name of the section.
        title: Its heading.
        seconds: Wall time of the run.
        body: Markdown after the machine line.
    """
    command = command_line()
    existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = (f"<!-- {key}:start -->\n## {title}\n\n{machine()} Command: `{command}`. "
               f"Wall time: {seconds:.0f} s.\n\n{body}\n<!-- {key}:end -->\n")
    pattern = re.compile(rf"<!-- {key}:start -->.*?<!-- {key}:end -->\n", re.S)
    if pattern.search(existing):
        updated = pattern.sub(lambda _: section, existing)
    else:
        updated = existing.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(updated)
