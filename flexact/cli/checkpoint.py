"""Checkpoints that are never half-written, and clear errors for ones that cannot be used.

Lightning's default ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary
file lives in the system temp folder: when that is another file system than the checkpoint
folder (a tmpfs ``/tmp``, a node-local disk under a cluster's shared storage), the final
``move`` is a copy, and a job killed during the copy leaves a truncated ``*.ckpt`` that looks
like the latest checkpoint. :class:`AtomicCheckpointIO` writes next to the target instead,
flushes the data to disk, and renames: the checkpoint path holds either the previous file or
the complete new one, never a mixture.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from flexact.errors import ConfigError
from flexact.modules.hparams import migrate_hparams
from flexact.nn.spec import check_same_candidates

__all__ = [
    "AtomicCheckpointIO",
    "check_checkpoint_file",
    "check_resume_candidates",
    "read_checkpoint",
    "use_atomic_checkpoints",
]

# What torch.load says about a truncated or damaged zip file.
_CORRUPT_MARKERS = ("PytorchStreamReader", "zip archive", "central directory")
_TEMP_SUFFIX = ".tmp"  # not ".ckpt": Lightning never lists a temporary file as a checkpoint


def _keep_storage(storage: Any, location: Any) -> Any:
    return storage  # Lightning's default map_location: storages stay on the CPU


def _fsync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every OS opens folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic, and whose load errors are clear.

    A checkpoint is written to a hidden temporary file in the same folder (``.<name>.<pid>.tmp``),
    ``fsync``-ed, then renamed over the target with ``os.replace``. A crash at any moment
    leaves the previous checkpoint intact; at worst a temporary file remains, which no loader
    takes for a checkpoint and which can be deleted. Remote paths (``s3://`` …) go through
    Lightning's own writer, whose object stores publish an object only when it is complete.

    Loading a missing, truncated or corrupt file raises :class:`~flexact.ConfigError` naming the
    path (the CLI prints it as one line).

    The ``flexact`` CLI uses this plugin unless another ``CheckpointIO`` is configured; with
    a plain ``Trainer`` pass ``plugins=[AtomicCheckpointIO()]``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        fs, local_path = fsspec.core.url_to_fs(str(path))
        if not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, "
                            f"got {storage_options!r}")
        target = Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{os.getpid()}{_TEMP_SUFFIX}")
        try:
            with open(temp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        _fsync_directory(target.parent)

    def load_checkpoint(self, path: Any, map_location: Any = _keep_storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        check_checkpoint_file(path)
        try:
            return super().load_checkpoint(path, map_location=map_location,
                                           weights_only=weights_only)
        except Exception as err:
            if _is_damage(err):
                raise _corrupt(path, err) from err
            raise


def check_checkpoint_file(path: Any) -> None:
    """Fail early, with a clear message, on a local checkpoint that is missing or incomplete.

    Checkpoints are zip archives (``torch.save``'s format since PyTorch 1.6); a truncated file
    lacks the archive's directory at its end, which is checked without reading the data.
    Remote paths are not checked.

    Raises:
        ConfigError: If the file does not exist or is not a complete zip archive.
    """
    fs, local_path = fsspec.core.url_to_fs(str(path))
    if not isinstance(fs, LocalFileSystem):
        return
    if not os.path.isfile(local_path):
        raise ConfigError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(local_path):
        raise _corrupt(path, "not a complete zip archive")
    stat = os.stat(local_path)
    key = (os.path.abspath(local_path), stat.st_size, stat.st_mtime_ns)
    if key in _CHECKED:
        return
    try:  # every entry's CRC: flipped bytes inside the archive, not only a cut-off end
        with zipfile.ZipFile(local_path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise _corrupt(path, err) from err
    if damaged is not None:
        raise _corrupt(path, f"the bytes of {damaged} do not match their checksum")
    _CHECKED.add(key)


_CHECKED: set[tuple[str, int, float]] = set()  # files whose checksums were verified


def read_checkpoint(path: Any) -> dict[str, Any] | None:
    """The contents of a local checkpoint, read safely (``weights_only``, memory-mapped).

    Returns:
        The checkpoint, or ``None`` when it holds objects that safe loading refuses (Lightning
        then loads it as ``--weights_only`` says, and reports problems itself).

    Raises:
        ConfigError: If the file is missing, truncated or damaged.
    """
    check_checkpoint_file(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        if _is_damage(err):
            raise _corrupt(path, err) from err
        return None


def check_resume_candidates(ckpt_path: Any, configured: Sequence[str] | None) -> None:
    """Refuse to resume from a checkpoint trained with other FlexAct candidates.

    LightningCLI restores the model's hyper-parameters from the checkpoint and so would replace
    the configured candidates silently; a config that disagrees with its checkpoint is an error
    instead. Only the pickled metadata is read (memory-mapped), not the weights.

    Args:
        ckpt_path: The ``--ckpt_path`` value (special values such as ``last`` are skipped).
        configured: The candidates of the configured model, if it has that argument.

    Raises:
        ConfigError: If the checkpoint is unreadable or was trained with other candidates.
    """
    if configured is None or not ckpt_path or not os.path.isfile(str(ckpt_path)):
        return
    hparams = dict((read_checkpoint(ckpt_path) or {}).get("hyper_parameters") or {})
    migrate_hparams(hparams)
    check_same_candidates((hparams.get("flexact") or {}).get("candidates"), configured,
                          f"the checkpoint {ckpt_path}")


def _is_damage(err: BaseException) -> bool:
    """Whether ``torch.load`` failed because the file's bytes are damaged."""
    if isinstance(err, pickle.UnpicklingError):
        # Not a refusal of readable but unsafe objects ("Weights only load failed ...").
        return "weights only" not in str(err).lower() and "weights_only" not in str(err).lower()
    if isinstance(err, (EOFError, zipfile.BadZipFile, UnicodeDecodeError)):
        return True
    if isinstance(err, OSError):
        return not isinstance(err, FileNotFoundError | PermissionError)
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _CORRUPT_MARKERS)


def _corrupt(path: Any, err: BaseException | str) -> ConfigError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"checkpoint {path} is truncated or corrupt ({reason}); use another "
                       "checkpoint (an earlier one, or last.ckpt)")


def use_atomic_checkpoints(trainer: L.Trainer) -> bool:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` if it uses Lightning's default writer.

    A ``CheckpointIO`` configured by the user (or one a strategy brings, e.g. for sharded
    checkpoints) is left alone.

    Returns:
        Whether the plugin was installed.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True
