"""A resumed ``flexact fit`` continues in the run folder of its checkpoint.

Without this, a run resumed with ``--ckpt_path runs/synthetic/version_0/checkpoints/last.ckpt``
would log to a new ``version_1``: TensorBoard would show two half-runs, and the selection files
(``selection_history.csv``, ``selection.json``, the plots) would be split between two folders.
:func:`resume_in_run_folder` points the TensorBoard logger back at ``version_0``: the resumed
run appends its events there (a purge step makes TensorBoard drop what the interrupted run
logged after the checkpoint, which the resumed run logs again), rewrites the selection files
whole (their history is in the checkpoint), and keeps writing ``last.ckpt`` in the same place.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from flexact.callbacks.checkpoint import RunCheckpoint

__all__ = ["find_last_checkpoint", "resume_in_run_folder", "run_folder_of"]


def run_folder_of(checkpoint: str | os.PathLike[str], root: str | os.PathLike[str]) -> str | None:
    """The run folder (``version_N``) under ``root`` that holds ``checkpoint``, if any.

    Args:
        checkpoint: A checkpoint file, e.g. ``runs/synthetic/version_3/checkpoints/last.ckpt``.
        root: A logger's root folder, e.g. ``runs/synthetic``.

    Returns:
        The name of ``root``'s sub-folder that contains the checkpoint (at any depth), or
        ``None`` when the checkpoint lies outside ``root`` or directly in it.
    """
    path, base = Path(checkpoint).resolve(), Path(root).resolve()
    if base not in path.parents:
        return None
    parts = path.relative_to(base).parts
    return parts[0] if len(parts) > 1 else None


def find_last_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest ``<root>/<version>/checkpoints/last*.ckpt``, or ``None``."""
    found = [p for p in Path(root).glob("*/checkpoints/last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _global_step(checkpoint: Path) -> int | None:
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None  # unreadable: Lightning reports it when it loads the checkpoint
    step = state.get("global_step") if isinstance(state, dict) else None
    return int(step) if isinstance(step, int) else None


def resume_in_run_folder(trainer: Trainer, ckpt_path: str | os.PathLike[str] | None) -> str | None:
    """Make a resumed fit log into the run folder of its checkpoint.

    Applies to the trainer's ``TensorBoardLogger`` when its version is not set: its version
    becomes the folder that holds ``ckpt_path`` (for ``ckpt_path="last"``, the folder of the
    newest ``last.ckpt`` under the logger's root). A checkpoint outside the logger's root, a
    configured version (``--trainer.logger.init_args.version``) or another logger keeps the
    usual new ``version_N``.

    Call it after the trainer is built and before it logs anything.

    Args:
        trainer: The trainer that will resume.
        ckpt_path: The ``--ckpt_path`` value (``None``: a fresh run, nothing changes).

    Returns:
        The version folder's name, or ``None`` when nothing changed.
    """
    if not ckpt_path:
        return None
    logger = trainer.logger
    # `_version`, `_default_hp_metric` and `_kwargs` are what TensorBoardLogger's own
    # `version=`, `default_hp_metric=` and SummaryWriter keywords set; the logger has no public
    # setter for them once it is built.
    if not isinstance(logger, TensorBoardLogger) or logger._version is not None:
        return None
    checkpoint = (find_last_checkpoint(logger.root_dir) if str(ckpt_path) == "last"
                  else Path(ckpt_path))
    if checkpoint is None:
        return None
    version = run_folder_of(checkpoint, logger.root_dir)
    if version is None:
        return None
    logger._version = version
    logger._default_hp_metric = False  # the interrupted run logged its placeholder at step 0
    step = _global_step(checkpoint)
    if step is not None:
        # TensorBoard drops the interrupted run's events after the checkpoint's step.
        logger._kwargs.setdefault("purge_step", step + 1)
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, RunCheckpoint):
            callback.resumes_in_place = True
    rank_zero_info(f"Resuming in the run folder of the checkpoint: {logger.log_dir}")
    return version
