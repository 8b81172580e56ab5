"""Resuming with ``--ckpt_path``: the configured model must be the checkpoint's model.

LightningCLI builds the model from the checkpoint's hyper-parameters, merged over the config.
:func:`compare_with_checkpoint` first compares what the user configured with those
hyper-parameters: a difference is an error naming every differing key, except for the
settings of :data:`SAFE_TO_CHANGE`, which the resumed run takes from the config (with a
warning); changed optimizer settings are applied to the restored optimizer by
:class:`OptimizerOverrides`.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from flexact.cli.faults import exception_chain
from flexact.errors import ConfigError
from flexact.nn.params import LR_SCALE_KEY

__all__ = [
    "SAFE_TO_CHANGE",
    "OptimizerOverrides",
    "check_resumed_model",
    "compare_with_checkpoint",
    "plain_numbers",
    "raised_by_a_module",
]


SAFE_TO_CHANGE = (
    "alpha", "sync_statistics", "kl_reduction", "compile", "compile_backend", "channels_last",
    "regularize_backbone", *(f"{spec}.{key}" for spec in ("flexact", "backbone_flexact")
                             for key in ("kl_lambda", "hard", "eval_mode", "compact_memory")),
    *(f"optimizer.init_args.{key}" for key in ("lr", "momentum", "betas", "eps")),
)
"""Model settings (``model.init_args.…``) that may differ from the checkpoint's on resume: the
run goes on with the configured value, with a warning. Any other difference is an error."""

_TRAINING_ONLY = ("optimizer.", "lr_scheduler.", "selection_weight_decay", "selection_lr_scale",
                  "selection_warmup")
_MISSING = object()


def plain_numbers(value: Any) -> Any:
    """``value`` with jsonargparse's restricted numbers (``PositiveInt(64)`` …) made plain.

    Namespaces, dicts and lists are changed in place. Restricted numbers carried from one class's
    arguments to another's (``--data MyData`` over a config whose data had a ``PositiveInt``
    batch size) cannot be written to YAML or loaded with ``weights_only``.
    """
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, (int, float)):
        return (int if isinstance(value, int) else float)(value)
    items = vars(value) if hasattr(value, "__dict__") and hasattr(value, "clone") else value
    if isinstance(items, (dict, list)):
        for key, item in (items.items() if isinstance(items, dict) else enumerate(items)):
            items[key] = plain_numbers(item)
    elif isinstance(value, tuple):
        return tuple(plain_numbers(item) for item in value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, os.PathLike) else plain_numbers(value)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        return {k: v for key, item in value.items()
                for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: _plain(value)}


def _given(user: Any, default: Any, prefix: str = "") -> dict[str, Any]:
    """Flat keys of ``user`` that differ from ``default`` (a subtree of another class: all)."""
    if isinstance(user, Mapping) and isinstance(default, Mapping) and (
            user.get("class_path") == default.get("class_path")):
        return {k: v for key, item in user.items()
                for k, v in _given(item, default.get(key, _MISSING), f"{prefix}{key}.").items()}
    if isinstance(user, Mapping):
        return _flat(user, prefix)
    return {} if _plain(user) == _plain(default) else {prefix[:-1]: _plain(user)}


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


def compare_with_checkpoint(ckpt_path: Any, hparams: dict[str, Any], given: Mapping[str, Any],
                            defaults: Mapping[str, Any], training: bool) -> dict[str, Any]:
    """Refuse to resume when the configured model differs from the checkpoint's.

    LightningCLI builds the model from the checkpoint's hyper-parameters, so a setting the user
    gave (a value of ``given`` that differs from ``defaults``) that the checkpoint does not share
    would be dropped silently. Keys of :data:`SAFE_TO_CHANGE` are kept instead (with a warning
    on stderr) and removed from ``hparams``, so the configured value wins. Evaluating
    (``training`` false: validate, test, predict) uses the checkpoint's model as saved: other
    differences are listed in a warning instead of an error.

    Args:
        ckpt_path: The checkpoint, for messages.
        hparams: Its (migrated) hyper-parameters; changed in place.
        given: The configured ``model.init_args``.
        defaults: The model class's defaults (``model.init_args``).
        training: ``fit``: optimizer settings count too.

    Returns:
        The changed safe optimizer settings, ``{name: (checkpoint value, new value)}``.

    Raises:
        ConfigError: If any other setting differs, when training.
    """
    saved = _flat(hparams)
    changed: dict[str, tuple[Any, Any]] = {}
    for key, new in _given(dict(given), dict(defaults)).items():
        if not training and key.startswith(_TRAINING_ONLY):
            continue
        parent = next((p for p in _prefixes(key) if p in saved), None)
        if parent is None or (parent == key and saved[key] == new):
            continue  # not in this (older) checkpoint, or the same
        changed[key] = (saved[parent], new)
    unsafe = [k for k in changed if k not in SAFE_TO_CHANGE]
    listed = "; ".join(f"model.init_args.{k} (checkpoint: {_show(changed[k][0])}, config: "
                       f"{_show(changed[k][1])})" for k in unsafe)
    if unsafe and training:
        raise ConfigError(
            f"the checkpoint {ckpt_path} was trained with other model settings than the config "
            f"gives: {listed}; resuming would train the checkpoint's model, not the configured "
            "one. Give the checkpoint's values (its run's config.yaml), or leave out --ckpt_path "
            "to start a new run")
    if unsafe:
        _warn(f"evaluating the model saved in {ckpt_path}, whose settings replace the config's: "
              f"{listed}")
    safe = "; ".join(f"model.init_args.{k} {_show(old)} → {_show(new)}"
                     for k, (old, new) in changed.items() if k in SAFE_TO_CHANGE)
    if safe:
        _warn(f"resuming from {ckpt_path} with changed settings (allowed on resume, see "
              f"docs/distributed.md): {safe}")
    for key in (k for k in changed if k in SAFE_TO_CHANGE):
        *parents, leaf = key.split(".")
        node: Any = hparams
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return {k.rpartition(".")[2]: v for k, v in changed.items() if k.startswith("optimizer.")}


def _warn(message: str) -> None:
    if rank_zero_only.rank == 0:
        print(f"flexact: warning: {message}", file=sys.stderr)


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


class OptimizerOverrides(Callback):
    """Apply changed optimizer settings after Lightning restored the checkpoint's optimizer.

    Args:
        values: ``{param-group key: (checkpoint value, new value)}``; groups holding the
            checkpoint value (and schedulers' ``base_lrs``) get the new one.
    """

    def __init__(self, values: Mapping[str, tuple[Any, Any]]) -> None:
        self.values = dict(values)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        same = _plain
        for key, (old, new) in self.values.items():
            names = (key, "initial_lr") if key == "lr" else (key,)
            for group in (g for opt in trainer.optimizers for g in opt.param_groups):
                # The selection logits' group runs at selection_lr_scale × the lr.
                scale = group.get(LR_SCALE_KEY, 1.0) if key == "lr" else 1.0
                was, now = (old * scale, new * scale) if scale != 1.0 else (old, new)
                for name in names:
                    if name in group and same(group[name]) == same(was):
                        group[name] = tuple(now) if isinstance(group[name], tuple) else now
            for config in trainer.lr_scheduler_configs if key == "lr" else ():
                base = getattr(config.scheduler, "base_lrs", None)
                if base is not None:
                    groups = config.scheduler.optimizer.param_groups
                    scales = [g.get(LR_SCALE_KEY, 1.0) for g in groups]
                    config.scheduler.base_lrs = [new * k if b == old * k else b
                                                 for b, k in zip(base, scales, strict=False)]


def check_resumed_model(cli: Any, subcommand: str, ckpt_path: str,
                        hparams: dict[str, Any]) -> dict[str, Any]:
    """Compare the CLI's configured model with the checkpoint's, before it replaces the config.

    Args:
        cli: The :class:`~flexact.cli.FlexActCLI` (its parsed config and subcommand parsers).
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
        ckpt_path: The checkpoint.
        hparams: Its migrated hyper-parameters (safe changes are removed from it).

    Returns:
        The changed optimizer settings to apply after the restore (:class:`OptimizerOverrides`).

    Raises:
        ConfigError: If the checkpoint holds another model class or other settings.
    """
    configured = cli.config[subcommand].get("model")
    if configured is None or not configured.get("class_path"):
        return {}
    saved_class = hparams.get("_class_path")
    if saved_class and _import(saved_class) is not _import(configured.class_path):
        raise ConfigError(
            f"the checkpoint {ckpt_path} holds a {saved_class.rpartition('.')[2]}, but the "
            f"config builds a {configured.class_path.rpartition('.')[2]}: resume with the "
            "config the checkpoint was trained with (its run's config.yaml), or leave out "
            "--ckpt_path to start a new run")
    base = cli.config[subcommand].clone()
    base.model = None
    parser = cli._subcommand_parsers[subcommand]
    exits, parser.exit_on_error = parser.exit_on_error, False  # defaults that do not parse:
    try:
        defaults = parser.parse_object({"model": {"class_path": configured.class_path}}, base)
    except Exception:  # nothing to compare against
        return {}
    finally:
        parser.exit_on_error = exits
    return compare_with_checkpoint(
        ckpt_path, hparams, configured.get("init_args", {}).as_dict(),
        defaults.model.init_args.as_dict(), training=subcommand == "fit")


def _import(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, dotted)
    except ImportError:
        return dotted


def raised_by_a_module(err: BaseException) -> bool:
    """Whether ``err`` (or an error it wraps) was raised while building a LightningModule."""
    return any(isinstance(frame.f_locals.get("self"), L.LightningModule)
               for cause in exception_chain(err)
               for frame, _ in traceback.walk_tb(cause.__traceback__))
