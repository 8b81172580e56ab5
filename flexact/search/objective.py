"""One search trial: a real ``fit`` of the user's config with the trial's expression(s).

A single-expression trial puts the expression at every activation site
(:func:`flexact.probe.sites.with_activation`), fits, and scores the validation split (the OOD
region when the data module has one: docs/data.md) and the test split (in-distribution). A
tournament trial puts one FlexAct layer over its k expressions at every site, fits, takes the
candidate with the highest mean selection probability, commits every site to it and fine-tunes
for ``finetune_epochs`` before scoring. :class:`PruningCallback` reports the monitored metric to
Optuna after every validation and stops the fit when the pruner says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from flexact.nn.layer import FlexAct, flexact_layers
from flexact.nn.spec import FlexActSpec
from flexact.probe.sites import activation_sites, with_activation

__all__ = ["PruningCallback", "SearchRun"]


class PruningCallback(Callback):
    """Report ``monitor`` to an Optuna trial after each validation; stop if it is pruned.

    Args:
        trial: The running trial.
        monitor: A logged validation metric (e.g. ``val_loss``).
    """

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial, self.monitor, self.pruned = trial, monitor, False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics[self.monitor]), trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned, trainer.should_stop = True, True


@dataclass
class SearchRun:
    """How trials train and what they score.

    Args:
        cli_args: ``--config ...`` and overrides, as for ``flexact fit`` (no subcommand).
        metric: The validation metric (``val_loss``, ``val_mse``, ``val_acc``, ...); the test
            split's ``test_*`` counterpart is the in-distribution score.
        objective: ``ood`` (the validation metric), ``id`` (the test metric) or ``both``.
        finetune_epochs: Epochs of the committed fine-tune after a tournament.
        root: Folder of the trials' runs.
    """

    cli_args: Sequence[str]
    metric: str = "val_loss"
    objective: str = "ood"
    finetune_epochs: int = 1
    root: Path = field(default_factory=lambda: Path("search"))

    def _cli(self, trial: optuna.Trial, extra: Sequence[str] = ()) -> Any:
        from flexact.cli.probe_engine import _instantiate

        return _instantiate([*self.cli_args, *extra,
                             f"--trainer.default_root_dir={self.root / str(trial.number)}"])

    def _scores(self, trainer: Trainer, module: LightningModule, data: Any) -> dict[str, float]:
        test_metric = "test_" + self.metric.removeprefix("val_")
        ood = trainer.validate(module, datamodule=data, verbose=False)[0][self.metric]
        ind = trainer.test(module, datamodule=data, verbose=False)[0][test_metric]
        return {"ood": float(ood), "id": float(ind)}

    def values(self, scores: dict[str, float]) -> float | list[float]:
        """What the trial returns to Optuna."""
        return [scores["id"], scores["ood"]] if self.objective == "both" else scores[
            self.objective]

    def evaluate(self, trial: optuna.Trial, expressions: list[str]) -> dict[str, Any]:
        """Train; return the scores, the winner, selection probabilities and steps spent.

        Raises:
            optuna.TrialPruned: If the pruner stopped the fit.
        """
        start = time.perf_counter()
        cli = self._cli(trial)
        module, data = cli.model, cli.datamodule
        sites = activation_sites(module.model)
        if len(expressions) == 1:
            with_activation(module.model, expressions[0], sites, inplace=True)
        else:
            spec = FlexActSpec.build(getattr(module, "spec", None), candidates=expressions)
            for path in sites:
                parent_name, _, name = path.rpartition(".")
                parent = module.model.get_submodule(parent_name) if parent_name else module.model
                setattr(parent, name, FlexAct(spec))
        pruning = PruningCallback(trial, self.metric)
        if self.objective != "both":  # Optuna prunes single-objective studies only
            cli.trainer.callbacks.append(pruning)
        cli.trainer.fit(module, datamodule=data)
        steps = int(cli.trainer.global_step)
        if pruning.pruned:
            trial.set_user_attr("steps", steps)
            raise optuna.TrialPruned(f"pruned at epoch {cli.trainer.current_epoch}")
        trainer, probabilities = cli.trainer, {}
        winner = expressions[0]
        if len(expressions) > 1:
            layers = [layer for _, layer in flexact_layers(module.model)]
            mean = torch.stack([layer.probabilities().reshape(-1, len(expressions)).mean(0)
                                for layer in layers]).mean(0)
            probabilities = dict(zip(expressions, (float(p) for p in mean), strict=True))
            winner = expressions[int(mean.argmax())]
            with_activation(module.model, winner, sites, inplace=True)  # commit every site
            tune = self._cli(trial, [f"--trainer.max_epochs={self.finetune_epochs}"])
            tune.trainer.fit(module, datamodule=data)
            steps += int(tune.trainer.global_step)
            trainer = tune.trainer
        scores = self._scores(trainer, module, data)
        if not all(math.isfinite(v) for v in scores.values()):
            raise FloatingPointError(f"non-finite scores {scores}")
        return {"scores": scores, "winner": winner, "probabilities": probabilities,
                "steps": steps, "seconds": time.perf_counter() - start}
