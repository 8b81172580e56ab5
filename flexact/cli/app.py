"""The ``flexact`` command line: LightningCLI with flexact's modules, data and callbacks.

Usage: ``flexact fit --config configs/synthetic.yaml`` (also ``validate``, ``test``, ``predict``).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any, ClassVar

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

import flexact

# Imported so that configs can use short class names (TemperatureAnnealing, SyntheticDataModule).
import flexact.backbones
import flexact.callbacks
import flexact.datamodules
from flexact.callbacks.finite_guard import FiniteGuard, NonFiniteLossError
from flexact.callbacks.rng import RNGState
from flexact.cli.checkpoint import check_resume_candidates, use_atomic_checkpoints
from flexact.cli.compose import expand_extends
from flexact.errors import ConfigError
from flexact.modules import FlexActModule
from flexact.modules.hparams import migrate_hparams

__all__ = ["FlexActCLI", "build_cli", "main"]


def _data_attribute(name: str) -> Any:
    def compute(datamodule: LightningDataModule) -> Any:
        value = getattr(datamodule, name, None)
        # Plain ints only: checkpoints are loaded with weights_only=True, which refuses
        # jsonargparse's restricted number types.
        return int(value) if isinstance(value, int) else value

    return compute


class FlexActCLI(LightningCLI):
    """LightningCLI whose model sizes are taken from the data module.

    ``model.init_args.in_features`` and ``model.init_args.num_outputs`` are linked to the data
    module's ``num_features`` and ``num_outputs`` attributes (``None`` when it has none).
    Every run gets a :class:`~flexact.callbacks.FiniteGuard` and an
    :class:`~flexact.callbacks.RNGState` (configured under ``finite_guard:`` and
    ``rng_state:``; one listed in ``trainer.callbacks`` takes its place). Checkpoints are written
    atomically (:class:`~flexact.cli.checkpoint.AtomicCheckpointIO`) unless another
    ``CheckpointIO`` plugin is configured, and checkpoints of earlier flexact versions are
    migrated as they are read (:mod:`flexact.modules.hparams`).
    """

    forced_callbacks: ClassVar[dict[str, type[Callback]]] = {"finite_guard": FiniteGuard,
                                                   "rng_state": RNGState,
                                                   "checkpoint": flexact.callbacks.RunCheckpoint}
    """Callbacks every run gets: config key → class."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version",
                            version=f"flexact {flexact.__version__}")
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key, kind in self.forced_callbacks.items():
            parser.add_lightning_class_args(kind, key)
        for source, target in (("num_features", "in_features"), ("num_outputs", "num_outputs")):
            parser.link_arguments("data", f"model.init_args.{target}",
                                  compute_fn=_data_attribute(source), apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # Before LightningCLI reads the checkpoint's hyper-parameters over the config.
        section = self.config.get(self.config.get("subcommand") or "") or self.config
        check_resume_candidates(section.get("ckpt_path"),
                                section.get("model.init_args.flexact.candidates"))

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyper-parameters over the config; those of an
        # earlier flexact version are migrated first (Lightning's own reader would reject them).
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not os.path.isfile(str(ckpt_path)):
            return
        checkpoint = torch.load(str(ckpt_path), weights_only=True, map_location="cpu", mmap=True)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        migrate_hparams(hparams)
        model: dict[str, Any] = hparams
        if "_class_path" in hparams:
            model = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # A forced callback gives way to one of its kind that the user configured (a plain
        # ModelCheckpoint of the user's is not a RunCheckpoint: the two work side by side).
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        no_checkpoints = config.get("enable_checkpointing") is False
        callbacks = [c for c in callbacks
                     if not (isinstance(c, tuple(self.forced_callbacks.values()))
                             and (any(isinstance(u, type(c)) for u in configured)
                                  or (no_checkpoints
                                      and isinstance(c, flexact.callbacks.RunCheckpoint))))]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Installed on the built trainer rather than as a trainer_defaults plugin, which a
        # user's own `trainer.plugins` (a precision or cluster plugin) would silently replace.
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        if self.subcommand == "fit":  # a resumed run continues in its checkpoint's run folder
            from flexact.cli.runs import resume_in_run_folder

            resume_in_run_folder(trainer, self.config["fit"].get("ckpt_path"))
        return trainer


def _find_config_error(err: BaseException) -> ConfigError | None:
    """The ConfigError behind ``err``; jsonargparse wraps errors raised while instantiating."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, ConfigError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def build_cli(args: list[str] | None = None) -> FlexActCLI:
    """Parse ``args`` and run the chosen subcommand; return the CLI object (used by tests).

    Configs with ``extends:`` are expanded first (:mod:`flexact.cli.compose`). Configuration
    errors (:class:`~flexact.ConfigError`) are printed as one line on stderr and end the program
    with exit status 2, like the parser's own errors; a diverged run
    (:class:`~flexact.callbacks.NonFiniteLossError`) is printed the same way, with status 1.

    Args:
        args: Command-line arguments (default: ``sys.argv[1:]``).
    """
    try:
        argv = sys.argv[1:] if args is None else list(args)
        expanded = expand_extends(argv)
        if args is not None or expanded != argv:
            args = expanded
        with warnings.catch_warnings():
            # Expanded configs are handed over as `args` even when run from the shell.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            return FlexActCLI(
                FlexActModule,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={
                    "description": "flexact: train networks that pick their activation "
                                   "functions.",
                    "epilog": "Other commands: `flexact plot HISTORY.csv` (selection plots), "
                              "`flexact export CHECKPOINT` (frozen TorchScript/ONNX); add "
                              "--help. A config may start with `extends: base.yaml`.",
                },
                args=args,
                auto_configure_optimizers=False,
            )
    except NonFiniteLossError as err:
        # A diverged run, not a usage error: exit status 1; under DDP every rank stops here.
        if rank_zero_only.rank == 0:
            print(f"flexact: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as err:
        cause = _find_config_error(err)
        if cause is None:
            raise
        print(f"flexact: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


# Subcommands that are not Trainer runs: name → "module:function" taking an argument list.
EXTRA_COMMANDS: dict[str, str] = {
    "plot": "flexact.tools.plot:main",
    "export": "flexact.cli.export:main",
}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``flexact`` command.

    ``flexact fit|validate|test|predict ...`` run LightningCLI; the names in
    :data:`EXTRA_COMMANDS` dispatch to their own parsers.

    Args:
        args: Command-line arguments (default: ``sys.argv[1:]``).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in EXTRA_COMMANDS:
        module_name, function = EXTRA_COMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module_name), function)(argv[1:])
        return
    build_cli(args)  # None lets LightningCLI read sys.argv itself
