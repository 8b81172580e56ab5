"""The module's hyper-parameters: what is saved, and how old checkpoints are migrated.

Checkpoints written before ``FlexActSpec`` and ``FlexActModule.model`` keep loading.
Until flexact 0.1 the module took the FlexAct settings as flat arguments (``candidates``,
``tau``, ``kl_lambda`` …) and held ``backbone`` and ``head`` itself. Such checkpoints are
migrated when they are read: the flat hyper-parameters move into ``flexact: {…}`` and the
state-dict keys gain the ``model.`` prefix. Nothing is written back to the file.
"""

from __future__ import annotations

import io
from collections.abc import MutableMapping
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import nn

try:  # Set by LightningCLI while it instantiates: then hparams hold configs, not modules.
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older or newer Lightning without the context variable
    _given_hyperparameters = None

__all__ = ["LEGACY_SPEC_KEYS", "migrate_hparams", "migrate_state_dict", "migrated_file",
           "unsaved_argument_names"]

LEGACY_SPEC_KEYS = ("candidates", "tau", "hard", "granularity", "eval_mode", "prior",
                    "kl_lambda", "mode")
"""Hyper-parameters that were flat module arguments and are now fields of ``flexact``."""

_MODEL_PARTS = ("backbone.", "head.")


def migrate_hparams(hparams: MutableMapping[str, Any]) -> bool:
    """Move legacy flat FlexAct settings into ``hparams["flexact"]``, in place.

    Returns:
        Whether anything changed.
    """
    legacy = {k: hparams.pop(k) for k in LEGACY_SPEC_KEYS if k in hparams}
    if not legacy:
        return False
    spec = dict(hparams.get("flexact") or {})
    spec.update(legacy)
    hparams["flexact"] = spec
    return True


def migrated_file(path: str | Path | IO[bytes]) -> str | Path | IO[bytes]:
    """``path``, or an in-memory copy of it with migrated hyper-parameters if it needs them."""
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return path
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not migrate_hparams(checkpoint.get("hyper_parameters", {})):
        return path
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer


def migrate_state_dict(state_dict: MutableMapping[str, Any]) -> bool:
    """Prefix the legacy ``backbone.*`` / ``head.*`` keys with ``model.``, in place.

    Returns:
        Whether anything changed.
    """
    if any(key.startswith("model.") for key in state_dict):
        return False
    legacy = [key for key in state_dict if key.startswith(_MODEL_PARTS)]
    for key in legacy:
        state_dict[f"model.{key}"] = state_dict.pop(key)
    return bool(legacy)


def unsaved_argument_names(frame: Any) -> list[str]:
    """Init arguments (of this class and subclasses) not to keep in ``hparams``.

    Modules are saved in the state dict already, and callables (optimizer factories) are code,
    which checkpoints loaded with ``weights_only=True`` must not contain.
    """
    if _given_hyperparameters is not None and _given_hyperparameters.get() is not None:
        return []  # LightningCLI passes the modules' configs, which are worth keeping
    init_args: dict[str, Any] = {}
    for local_args in collect_init_args(frame, [], classes=(HyperparametersMixin,)):
        init_args.update(local_args)
    return [name for name, value in init_args.items()
            if isinstance(value, nn.Module) or callable(value)]
