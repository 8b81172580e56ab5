"""One line for faults at run time: a folder the run cannot write, a diverged run.

Also drops Lightning's "💡 Tip" adverts from the command's output, and finds the error that a
wrapped exception hides (:func:`exception_chain`).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator

__all__ = ["exception_chain", "explain_non_finite", "explain_os_error", "quiet_lightning_tips"]


_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def explain_os_error(err: BaseException) -> str | None:
    """One line for a folder or file the run cannot write (read-only, no permission, full).

    Returns:
        The line, or ``None`` if no such error is behind ``err``.
    """
    for cause in exception_chain(err):
        if isinstance(cause, OSError) and cause.errno in _NOT_WRITABLE and cause.filename:
            what = "no space left" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else (
                "read-only or not writable")
            return (f"cannot write {cause.filename} ({what}: {cause.strerror}); give the run "
                    "a writable folder with --trainer.default_root_dir DIR (and the logger's "
                    "--trainer.logger.init_args.save_dir DIR), or make that one writable")
    return None


def exception_chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the errors behind it (``__cause__``, ``__context__``).

    jsonargparse and Lightning wrap what a class raised; this finds it.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def explain_non_finite(message: str) -> str:
    """A :class:`~flexact.callbacks.NonFiniteLossError` message with the options that fix τ."""
    return message.replace("raise the model's tau or TemperatureAnnealing's end",
                           "raise the model's tau (--model.flexact.tau) or the annealing's end "
                           "(--temperature.end)")


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning_tips() -> None:
    """Drop Lightning's "💡 Tip" adverts (for its cloud products) from the command's output."""
    from lightning_utilities.core import rank_zero

    for logger in {rank_zero.log, logging.getLogger("lightning.pytorch.utilities.rank_zero"),
                   logging.getLogger("lightning.fabric.utilities.rank_zero")}:
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())
