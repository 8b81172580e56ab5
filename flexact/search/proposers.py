"""What each sampler proposes for a trial: one expression, or k for a FlexAct tournament.

``random``, ``tpe`` and ``nsga2`` are Optuna's samplers over the schema's slots (categorical
parameters ``slot0``, ...). ``evolution`` is regularized evolution (Real et al. 2019): the
population is the latest ``population`` finished trials; a parent is the best of a random
``tournament`` of them, and the mutator proposes its child. ``surrogate`` evaluates the
unevaluated function the probe's surrogate (:mod:`flexact.probe.surrogate`) predicts best,
refitted on every finished trial. ``tournament`` trains a FlexAct layer over the k best
predicted unevaluated functions in one trial, so one run ranks k candidates.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from flexact.search.space import Mutator, SearchSpace, grammar_mutator

__all__ = ["SAMPLERS", "Proposer", "make_proposer", "make_sampler", "seen_expressions"]

SAMPLERS = ("random", "tpe", "evolution", "surrogate", "tournament", "nsga2")


def make_sampler(name: str, seed: int, multi_objective: bool) -> optuna.samplers.BaseSampler:
    """The Optuna sampler behind a proposer (slot samplers use it; the others only store)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    return optuna.samplers.RandomSampler(seed=seed)


def seen_expressions(study: optuna.Study, exclude: int | None = None) -> set[str]:
    """Canonical forms of every expression a trial evaluates, evaluated or is evaluating."""
    seen: set[str] = set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE,
                                                      TrialState.PRUNED, TrialState.WAITING)):
        if t.number != exclude:
            seen.update(t.user_attrs.get("expressions", []))
    return seen


def _finished(study: optuna.Study) -> list[tuple[str, float]]:
    """(expression, value) of completed single-objective trials, oldest first."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.values and len(t.values) == 1 and t.user_attrs.get("winner"):
            sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
            out.append((t.user_attrs["winner"], sign * t.values[0]))
    return out


class Proposer:
    """Base: a proposer returns the expressions one trial evaluates (lower score is better)."""

    k = 1

    def __init__(self, space: SearchSpace, seed: int) -> None:
        self.space = space
        self.rng = random.Random(seed)

    def propose(self, study: optuna.Study, trial: optuna.Trial) -> list[str]:
        raise NotImplementedError

    def _unseen_random(self, seen: set[str], n: int) -> list[str]:
        out: list[str] = []
        for _ in range(200 * n):
            text = self.space.expression(self.space.random_slots(self.rng))
            if text not in seen and text not in out:
                out.append(text)
                if len(out) == n:
                    break
        return out or [self.space.expression(self.space.random_slots(self.rng))]


class SlotProposer(Proposer):
    """Optuna's sampler picks every slot (random, TPE, NSGA-II)."""

    def propose(self, study: optuna.Study, trial: optuna.Trial) -> list[str]:
        values = [trial.suggest_categorical(f"slot{i}", self.space.choices(i))
                  for i in range(len(self.space.kinds))]
        trial.set_user_attr("slots", values)
        return [self.space.expression(values)]


class EvolutionProposer(Proposer):
    """Regularized evolution with a pluggable mutator."""

    def __init__(self, space: SearchSpace, seed: int, mutator: Mutator | None = None,
                 population: int = 16, tournament: int = 4) -> None:
        super().__init__(space, seed)
        self.mutator = mutator or grammar_mutator(space)
        self.population, self.tournament = population, tournament

    def propose(self, study: optuna.Study, trial: optuna.Trial) -> list[str]:
        finished = _finished(study)
        seen = seen_expressions(study, trial.number)
        if len(finished) < self.population:
            return self._unseen_random(seen, 1)
        alive = finished[-self.population:]  # regularized: the oldest die
        for _ in range(20):
            parents = self.rng.sample(alive, min(self.tournament, len(alive)))
            children = [c for c in self.mutator(parents, self.rng) if c not in seen]
            if children:
                return [children[0]]
        return self._unseen_random(seen, 1)


class SurrogateProposer(Proposer):
    """The probe's surrogate over the space's functions; k > 1 makes it a tournament."""

    def __init__(self, space: SearchSpace, seed: int, features: Callable[[list[str]], Any],
                 k: int = 1, startup: int = 4) -> None:
        super().__init__(space, seed)
        self.k, self.startup = k, startup
        self.functions = space.functions()
        self.features = features(self.functions)
        self.index = {f: i for i, f in enumerate(self.functions)}

    def propose(self, study: optuna.Study, trial: optuna.Trial) -> list[str]:
        from flexact.probe.surrogate import predict

        seen = seen_expressions(study, trial.number)
        known = [(self.index[e], v) for e, v in _finished(study) if e in self.index]
        free = [i for i, f in enumerate(self.functions) if f not in seen]
        if not free:
            return self._unseen_random(seen, self.k)
        if len(known) < self.startup:
            return [self.functions[i] for i in self.rng.sample(free, min(self.k, len(free)))]
        pred = predict(self.features, [i for i, _ in known], [v for _, v in known],
                       embedding="none", seed=trial.number)
        best = sorted(free, key=lambda i: pred[i])[:self.k]
        return [self.functions[i] for i in best]


def make_proposer(name: str, space: SearchSpace, seed: int, *, k: int = 8,
                  mutator: Mutator | None = None,
                  features: Callable[[list[str]], np.ndarray] | None = None) -> Proposer:
    """The proposer of sampler ``name`` (see the module docstring)."""
    if name in ("random", "tpe", "nsga2"):
        return SlotProposer(space, seed)
    if name == "evolution":
        return EvolutionProposer(space, seed, mutator)
    if features is None:
        raise ValueError("the surrogate and tournament samplers need a features function")
    return SurrogateProposer(space, seed, features, k=k if name == "tournament" else 1)
