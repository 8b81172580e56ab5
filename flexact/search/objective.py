"""One search trial: a real ``fit`` of the user's config with the trial's expression(s).

A single-expression trial puts the expression at every activation site
(:func:`flexact.probe.sites.with_activation`), fits, and scores the validation split (the OOD
region when the data module has one: docs/data.md) and the test split (in-distribution). A
tournament trial puts one FlexAct layer over its k expressions at every site, fits, picks a
winner by ``tournament_score`` (:mod:`flexact.search.oneshot`), commits every site to it and
fine-tunes for ``finetune_epochs`` before scoring. :class:`PruningCallback` reports the
monitored metric to Optuna after every validation and stops the fit when the pruner says so.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch import Callback, LightningModule, Trainer

from flexact.nn.layer import FlexAct
from flexact.nn.spec import FlexActSpec
from flexact.nn.surgery import share_selection
from flexact.probe.sites import activation_sites, with_activation
from flexact.search.oneshot import mean_probabilities, oneshot_scores, ranked

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
        tournament_score: How a tournament picks its winner: ``probability``, ``oneshot`` or
            ``finetune`` (:mod:`flexact.search.oneshot`).
        top: Candidates the ``finetune`` rule fine-tunes (the best ``top`` by one-shot score).
    """

    cli_args: Sequence[str]
    metric: str = "val_loss"
    objective: str = "ood"
    finetune_epochs: int = 1
    root: Path = field(default_factory=lambda: Path("search"))
    tournament_score: str = "probability"
    top: int = 2

    @property
    def maximize(self) -> bool:
        """Whether a higher metric is better (accuracies)."""
        return "acc" in self.metric

    def _cli(self, trial: optuna.Trial, extra: Sequence[str] = ()) -> Any:
        from flexact.cli.probe_engine import _instantiate

        return _instantiate([*self.cli_args, *extra,
                             f"--trainer.default_root_dir={self.root / str(trial.number)}"])

    def _validate(self, trainer: Trainer, module: LightningModule, data: Any) -> float:
        return float(trainer.validate(module, datamodule=data, verbose=False)[0][self.metric])

    def _scores(self, trainer: Trainer, module: LightningModule, data: Any) -> dict[str, float]:
        test_metric = "test_" + self.metric.removeprefix("val_")
        ind = trainer.test(module, datamodule=data, verbose=False)[0][test_metric]
        return {"ood": self._validate(trainer, module, data), "id": float(ind)}

    def values(self, scores: dict[str, float]) -> float | list[float]:
        """What the trial returns to Optuna."""
        return [scores["id"], scores["ood"]] if self.objective == "both" else scores[
            self.objective]

    def evaluate(self, trial: optuna.Trial, expressions: list[str]) -> dict[str, Any]:
        """Train; return the scores, the winner, steps spent and a tournament's record.

        A tournament's record: each candidate's selection probability, one-shot and fine-tuned
        validation score (empty where the rule computes none) and ``eval_passes``, the
        validation passes its scoring cost (no optimizer steps; not part of ``steps``).

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
                layer, old = FlexAct(spec), getattr(parent, name)
                if isinstance(old, FlexAct):  # keep what the module resolved ("auto" settings)
                    layer.selection_gradient = old.selection_gradient
                    layer.regularize, layer.sync_statistics = old.regularize, old.sync_statistics
                setattr(parent, name, layer)
            if getattr(getattr(module, "selection", None), "share", False):
                share_selection(module.model)  # one selection, as the module's layers had
        pruning = PruningCallback(trial, self.metric)
        if self.objective != "both":  # Optuna prunes single-objective studies only
            cli.trainer.callbacks.append(pruning)
        cli.trainer.fit(module, datamodule=data)
        steps = int(cli.trainer.global_step)
        if pruning.pruned:
            trial.set_user_attr("steps", steps)
            raise optuna.TrialPruned(f"pruned at epoch {cli.trainer.current_epoch}")
        trainer, tour = cli.trainer, {"probabilities": {}, "oneshot": {}, "finetuned": {}}
        winner = expressions[0]
        if len(expressions) > 1:
            winner, trainer, tour = self._tournament(trial, module, data, sites, expressions)
            steps += tour.pop("steps")
        scores = self._scores(trainer, module, data)
        if not all(math.isfinite(v) for v in scores.values()):
            raise FloatingPointError(f"non-finite scores {scores}")
        return {"scores": scores, "winner": winner, "steps": steps,
                "seconds": time.perf_counter() - start, **tour}

    def _tournament(self, trial: optuna.Trial, module: LightningModule, data: Any,
                    sites: list[str], expressions: list[str]
                    ) -> tuple[str, Trainer, dict[str, Any]]:
        """Pick the winner, commit every site to it and fine-tune (module.model is replaced).

        Returns the winner, the trainer that fine-tuned it, and the tournament's record:
        probabilities, one-shot and fine-tuned validation scores, steps and eval passes.
        """
        tour: dict[str, Any] = {"probabilities": mean_probabilities(module.model, expressions),
                                "oneshot": {}, "finetuned": {}, "steps": 0}
        order = ranked(tour["probabilities"], maximize=True)
        # Scoring passes validate without inference mode: tensors it creates (the metrics'
        # states) could not be updated by the fine-tunes that follow.
        judge: Trainer | None = None
        if self.tournament_score != "probability":
            judge = scorer = self._cli(trial, ["--trainer.inference_mode=false"]).trainer
            tour["oneshot"] = oneshot_scores(module.model, sites, expressions,
                                             lambda: self._validate(scorer, module, data))
            order = ranked(tour["oneshot"], self.maximize)
        contenders = order[:self.top] if self.tournament_score == "finetune" else order[:1]
        shared = copy.deepcopy(module.model) if len(contenders) > 1 else module.model
        tuned: dict[str, tuple[Any, Trainer]] = {}
        for name in contenders:
            # One contender commits in place; several each start from the shared weights.
            module.model = with_activation(shared, name, sites, inplace=len(contenders) == 1)
            tune = self._cli(trial, [f"--trainer.max_epochs={self.finetune_epochs}"])
            tune.trainer.fit(module, datamodule=data)
            tour["steps"] += int(tune.trainer.global_step)
            tuned[name] = module.model, tune.trainer
            if judge is not None and len(contenders) > 1:
                tour["finetuned"][name] = self._validate(judge, module, data)
        winner = ranked(tour["finetuned"], self.maximize)[0] if tour["finetuned"] \
            else contenders[0]
        module.model, trainer = tuned[winner]
        tour["eval_passes"] = len(tour["oneshot"]) + len(tour["finetuned"])
        return winner, trainer, tour
