"""The Optuna objective of ``flexact search``: propose, skip duplicates, train, record."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from flexact.search.objective import SearchRun
from flexact.search.proposers import Proposer

__all__ = ["make_objective"]


def _duplicate_of(study: optuna.Study, trial: optuna.Trial, expressions: list[str]
                  ) -> optuna.trial.FrozenTrial | None:
    """An earlier trial that trains or trained the same single expression, if any.

    Two workers may propose the same expression at once: each records it first, then the
    lower trial number trains and the other does not, so no expression is trained twice.
    """
    if len(expressions) != 1:
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE,
                                                      TrialState.PRUNED)):
        if t.number < trial.number and t.user_attrs.get("expressions") == expressions \
                and "duplicate_of" not in t.user_attrs:
            return t
    return None


def make_objective(search: SearchRun, proposer: Proposer, sampler: str
                   ) -> Callable[[optuna.Trial], Any]:
    """The function ``study.optimize`` calls once per trial."""

    def objective(trial: optuna.Trial) -> Any:
        study = trial.study
        # A re-queued trial (its worker died) keeps the expressions it was given.
        expressions = trial.user_attrs.get("expressions") or proposer.propose(study, trial)
        trial.set_user_attr("expressions", list(expressions))
        trial.set_user_attr("sampler", sampler)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        earlier = _duplicate_of(study, trial, list(expressions))
        if earlier is not None:
            trial.set_user_attr("duplicate_of", earlier.number)
            trial.set_user_attr("steps", 0)
            if earlier.state == TrialState.COMPLETE:  # the sampler learns the known value
                for key in ("winner", "scores"):
                    trial.set_user_attr(key, earlier.user_attrs.get(key))
                return earlier.values if len(earlier.values) > 1 else earlier.values[0]
            raise optuna.TrialPruned(f"duplicate of trial {earlier.number}")
        try:
            result = search.evaluate(trial, list(expressions))
        except optuna.TrialPruned:
            raise
        except Exception as err:  # a diverged or broken fit fails this trial, not the study
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}"[:500])
            trial.set_user_attr("steps", trial.user_attrs.get("steps", 0))
            return float("nan")  # Optuna records the trial as failed
        trial.set_user_attr("winner", result["winner"])
        trial.set_user_attr("scores", result["scores"])
        for key in ("probabilities", "oneshot", "finetuned"):
            trial.set_user_attr(key, result[key])
        trial.set_user_attr("eval_passes", result.get("eval_passes", 0))
        trial.set_user_attr("steps", result["steps"])
        trial.set_user_attr("seconds", round(result["seconds"], 2))
        return search.values(result["scores"])

    return objective
