"""The ``flexact`` command line: LightningCLI with flexact's modules, data and callbacks.

Usage: ``flexact fit --config configs/synthetic.yaml`` (also ``validate``, ``test``, ``predict``).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any, ClassVar

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
from flexact.callbacks.temperature import TemperatureAnnealing
from flexact.cli.checkpoint import (
    check_checkpoint_file,
    check_resume_candidates,
    read_checkpoint,
    use_atomic_checkpoints,
)
from flexact.cli.compose import expand_extends
from flexact.cli.explain import FlexActArgumentParser, explain_config_error
from flexact.cli.faults import (
    exception_chain,
    explain_non_finite,
    explain_os_error,
    quiet_lightning_tips,
)
from flexact.cli.resume import (
    OptimizerOverrides,
    check_resumed_model,
    plain_numbers,
    raised_by_a_module,
)
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
    ``rng_state:``; one listed in ``trainer.callbacks`` takes its place). τ is annealed by the
    :class:`~flexact.callbacks.TemperatureAnnealing` under ``temperature:`` (``--temperature.end
    1e-3``; off until ``start`` or ``end`` is set). Checkpoints are written
    atomically (:class:`~flexact.cli.checkpoint.AtomicCheckpointIO`) unless another
    ``CheckpointIO`` plugin is configured, and checkpoints of earlier flexact versions are
    migrated as they are read (:mod:`flexact.modules.hparams`).
    """

    forced_callbacks: ClassVar[dict[str, type[Callback]]] = {"finite_guard": FiniteGuard,
                                                   "rng_state": RNGState,
                                                   "temperature": TemperatureAnnealing,
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
        parser.set_defaults({"temperature.end": None})  # no annealing unless configured
        for source, target in (("num_features", "in_features"), ("num_outputs", "num_outputs")):
            parser.link_arguments("data", f"model.init_args.{target}",
                                  compute_fn=_data_attribute(source), apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        FlexActArgumentParser.sections = self.forced_callbacks
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
        if ckpt_path and str(ckpt_path).split(":")[0] not in ("last", "best", "hpc", "registry"):
            check_checkpoint_file(ckpt_path)  # missing or damaged: before anything is written
        if not ckpt_path or not os.path.isfile(str(ckpt_path)):
            return
        hparams = dict((read_checkpoint(ckpt_path) or {}).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        migrate_hparams(hparams)
        self._optimizer_overrides = check_resumed_model(self, subcommand, str(ckpt_path),
                                                        hparams)
        model: dict[str, Any] = hparams
        if "_class_path" in hparams:
            model = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        self._resumed_from = str(ckpt_path)

    def before_instantiate_classes(self) -> None:
        plain_numbers(self.config)  # restricted ints carried to another class do not serialize

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # the checkpoint's model does not fit this data: name it
            cause, resumed = _find_config_error(err), getattr(self, "_resumed_from", None)
            if cause is None or resumed is None or not raised_by_a_module(err):
                raise
            raise ConfigError(f"the model saved in the checkpoint {resumed} cannot be built with "
                              f"this config ({cause}); resume with the config it was trained "
                              "with (its run's config.yaml), or leave out --ckpt_path") from err

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
        for key, kind in self.forced_callbacks.items():  # configured twice: which one counts?
            section = self.config[self.subcommand].get(key) if self.subcommand else None
            if section and section != self.parser_defaults(key) and any(
                    isinstance(u, kind) for u in configured):
                raise ConfigError(f"{kind.__name__} is configured twice, under `{key}:` and in "
                                  f"trainer.callbacks; keep one (`{key}:` is the one that "
                                  f"--{key}.<argument> reaches)")
        if getattr(self, "_optimizer_overrides", None):
            callbacks = [*callbacks, OptimizerOverrides(self._optimizer_overrides)]
        return super()._instantiate_trainer(config, callbacks)

    def parser_defaults(self, key: str) -> Any:
        """The default value of the top-level ``key`` of the running subcommand."""
        return self._subcommand_parsers[self.subcommand].get_defaults().get(key)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Installed on the built trainer rather than as a trainer_defaults plugin, which a
        # user's own `trainer.plugins` (a precision or cluster plugin) would silently replace.
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        for callback in trainer.callbacks:  # before anything is written, not at train start
            if isinstance(callback, flexact.callbacks.SelectionCommit):
                callback.check_module(self.model)
        if self.subcommand == "fit":  # a resumed run continues in its checkpoint's run folder
            from flexact.cli.runs import resume_in_run_folder

            resume_in_run_folder(trainer, self.config["fit"].get("ckpt_path"))
        return trainer


def _find_config_error(err: BaseException) -> ConfigError | None:
    """The ConfigError behind ``err``; jsonargparse wraps errors raised while instantiating."""
    return next((e for e in exception_chain(err) if isinstance(e, ConfigError)), None)


def build_cli(args: list[str] | None = None, run: bool = True) -> FlexActCLI:
    """Parse ``args`` and run the chosen subcommand; return the CLI object (used by tests).

    Configs with ``extends:`` are expanded first (:mod:`flexact.cli.compose`). Configuration
    errors (:class:`~flexact.ConfigError`) are printed as one line on stderr and end the program
    with exit status 2, like the parser's own errors; a diverged run
    (:class:`~flexact.callbacks.NonFiniteLossError`) is printed the same way, with status 1.

    Args:
        args: Command-line arguments (default: ``sys.argv[1:]``).
        run: Run the subcommand; ``False``: ``args`` name no subcommand and the CLI only
            instantiates the model, data module and trainer (``flexact probe`` does this).
    """
    quiet_lightning_tips()
    try:
        argv = sys.argv[1:] if args is None else list(args)
        FlexActArgumentParser.args[:] = argv  # as given: errors name the files, not expansions
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
                parser_class=FlexActArgumentParser,
                parser_kwargs={
                    "prog": "flexact",
                    "description": "flexact: train networks that pick their activation "
                                   "functions.",
                    "epilog": "Other commands: `flexact plot HISTORY.csv` (selection plots), "
                              "`flexact export CHECKPOINT` (frozen TorchScript/ONNX), "
                              "`flexact probe --config CONFIG` (rank candidate activations "
                              "before training); add --help. A config may start with "
                              "`extends: base.yaml`.",
                },
                args=args,
                run=run,
                auto_configure_optimizers=False,
            )
    except NonFiniteLossError as err:
        # A diverged run, not a usage error: exit status 1; under DDP every rank stops here.
        if rank_zero_only.rank == 0:
            print(f"flexact: error: {explain_non_finite(str(err))}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as err:
        cause = _find_config_error(err)
        line = (explain_config_error(str(cause), FlexActArgumentParser.args)
                if cause is not None else explain_os_error(err))
        if line is None:
            raise
        if rank_zero_only.rank == 0:
            print(f"flexact: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


# Subcommands that are not Trainer runs: name → "module:function" taking an argument list.
EXTRA_COMMANDS: dict[str, str] = {
    "plot": "flexact.tools.plot:main",
    "export": "flexact.cli.export:main",
    "probe": "flexact.cli.probe:main",
    "search": "flexact.cli.search:main",
}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``flexact`` command.

    ``flexact fit|validate|test|predict ...`` run LightningCLI; the names in
    :data:`EXTRA_COMMANDS` dispatch to their own parsers.

    Args:
        args: Command-line arguments (default: ``sys.argv[1:]``).
    """
    argv = sys.argv[1:] if args is None else list(args)
    from flexact.__main__ import answer_without_lightning

    if answer_without_lightning(argv):
        raise SystemExit(0)  # as argparse does after --help and --version
    if argv and argv[0] in EXTRA_COMMANDS:
        module_name, function = EXTRA_COMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module_name), function)(argv[1:])
        return
    build_cli(args)  # None lets LightningCLI read sys.argv itself
