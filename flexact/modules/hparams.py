"""The module's hyper-parameters: what is saved, and how old checkpoints are migrated.

Checkpoints written before ``FlexActSpec`` and ``FlexActModule.model`` keep loading.
Until flexact 0.1 the module took the FlexAct settings as flat arguments (``candidates``,
``tau``, ``kl_lambda`` …) and held ``backbone`` and ``head`` itself. Such checkpoints are
migrated when they are read: the flat hyper-parameters move into ``flexact: {…}`` and the
state-dict keys gain the ``model.`` prefix. Settings whose default changed since a checkpoint
was written get the default it was trained with (:data:`EARLIER_DEFAULTS`). Nothing is written
back to the file.
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

from flexact.modules.selection import check_shared_checkpoint

try:  # Set by LightningCLI while it instantiates: then hparams hold configs, not modules.
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older or newer Lightning without the context variable
    _given_hyperparameters = None

__all__ = ["EARLIER_DEFAULTS", "LEGACY_SPEC_KEYS", "MigratedCheckpoints", "migrate_hparams",
           "migrate_state_dict", "migrated_file", "unsaved_argument_names"]

LEGACY_SPEC_KEYS = ("candidates", "tau", "hard", "granularity", "eval_mode", "prior",
                    "kl_lambda", "mode")
"""Hyper-parameters that were flat module arguments and are now fields of ``flexact``."""

EARLIER_DEFAULTS = {"share_selection": False, "selection_warmup": 0.0, "selection_lr_scale": 1.0}
"""Module settings a checkpoint may lack, and the value it was trained with (before an option
existed, its behaviour was the value here); each became ``None``, a default that depends on
``swap_backbone``."""

_MODEL_PARTS = ("backbone.", "head.")


def migrate_hparams(hparams: MutableMapping[str, Any]) -> bool:
    """Move legacy flat FlexAct settings into ``hparams["flexact"]``, in place.

    Returns:
        Whether anything changed.
    """
    earlier = {k: v for k, v in EARLIER_DEFAULTS.items()
               if "swap_backbone" in hparams and k not in hparams}  # a FlexActModule's
    hparams.update(earlier)
    if "swap_backbone" in hparams and "selection_lr_scale_end" not in hparams:
        # Trained before the rate could change over a run: at its constant selection_lr_scale.
        hparams["selection_lr_scale_end"] = hparams["selection_lr_scale"]
        earlier["selection_lr_scale_end"] = hparams["selection_lr_scale"]
    legacy = {k: hparams.pop(k) for k in LEGACY_SPEC_KEYS if k in hparams}
    spec = hparams.get("flexact")
    if "swap_backbone" in hparams and (legacy or spec is not None) and (
            "selection_gradient" not in (spec or {})):
        # Saved before "auto" (standardized in a head-only head) became the default: raw.
        legacy["selection_gradient"] = "raw"
    if not legacy:
        return bool(earlier)
    spec = dict(spec or {})
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


class MigratedCheckpoints:
    """LightningModule mixin: checkpoints of every flexact version load, migrated when read."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Migrate an old checkpoint's state dict; refuse per-layer logits for shared ones."""
        migrate_state_dict(checkpoint.get("state_dict", {}))
        share = getattr(getattr(self, "selection", None), "share", False)
        check_shared_checkpoint(checkpoint.get("state_dict", {}), share)

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path: str | Path | IO[bytes], *args: Any, **kwargs: Any
    ) -> Any:
        """Lightning's ``load_from_checkpoint``, for checkpoints of every flexact version."""
        return super().load_from_checkpoint(  # type: ignore[misc]
            migrated_file(checkpoint_path), *args, **kwargs)
