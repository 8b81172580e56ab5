"""``SelectionCommit``: fix each FlexAct layer's pick for the rest of training.

``mode: fixed`` commits every layer after a fraction ``at`` of the run. ``mode: adaptive``
commits each layer on its own once it has settled (its top probability at or above
``threshold`` for ``patience`` consecutive checks, checked every ``check_every_n_steps``
steps and never before ``min_fraction`` of the run), and every layer still open at ``at``.
A committed layer applies only its pick, so it costs what that activation costs. With
``prune_below: ε`` the same checks also drop, for good, every candidate whose probability
stayed below ε for ``patience`` checks, so an open layer mixes fewer candidates. With
``verify: true`` each commit first checks the pick against the other live candidates by each
sample's error on the commit step's batch (flexact/callbacks/_verify.py).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import ClosedUnitInterval, PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import Callback

from flexact.callbacks._checks import check_choice, check_flag, check_fraction, check_positive_int
from flexact.callbacks._optimizer_state import check_clearable, clear_state
from flexact.callbacks._verify import check_group, check_verifiable, check_z
from flexact.callbacks.progress import progress_position, run_length
from flexact.callbacks.selection_summary import named_layers
from flexact.errors import ConfigError
from flexact.nn import FlexAct

__all__ = ["SelectionCommit"]


class SelectionCommit(Callback):
    """Commit FlexAct layers to their picks: all at a fraction of training, or each when settled.

    Before its commit a layer selects as usual (Gumbel-Softmax mixture plus regularizer); after
    it, it applies exactly the picked activation in training too, so the remaining steps
    fine-tune the weights to the activation that evaluation uses. Not part of the paper's method
    (see benchmarks/RESULTS.md, Table 1).

    Every decision is a function of the trainer's progress and of the logits, which are equal on
    all ranks, so resumed and multi-device runs commit at the same steps (``verify``'s check
    also reads the commit step's batch, its counts summed over all ranks). The commit step of each
    layer is kept in checkpoints, logged as ``selection/<layer>/committed_at`` and written to
    ``selection.json`` by :class:`~flexact.callbacks.SelectionLogger`.

    Args:
        at: Fraction of the run (0–1) after which every layer is committed (the latest moment).
        interval: Measure progress in optimizer ``step``s or ``epoch``s.
        total: Length of the run in intervals; defaults to the trainer's.
        mode: ``fixed``: all layers at ``at``; ``adaptive``: each layer once it has settled.
        threshold: Adaptive: the top selection probability a settled layer holds (per-channel
            layers: every channel's).
        patience: Adaptive: consecutive checks at or above ``threshold`` before a commit.
        min_fraction: Adaptive: no commit before this fraction of the run.
        check_every_n_steps: Adaptive: read the probabilities (one device-to-host copy for all
            layers) every this many optimizer steps, never more often.
        prune_below: Adaptive: drop a candidate whose probability (per-channel layers: in
            every channel) stayed below this for ``patience`` checks; ``null``: no pruning.
        verify: Check each pick at its commit: every live candidate applied alone (in the layer
            and the layers sharing its logits) to the commit step's batch, weights as they are,
            eval mode; another candidate replaces the pick if its mean error (the module's
            ``sample_errors``, classifiers: misclassified or not; else its loss) is lower and
            it errs less on more samples by a sign test's ``verify_z`` (the others are
            dropped). Catches twins the logits cannot tell apart (ReLU and LeakyReLU) and an
            early lock on the wrong candidate. Per-layer selections only; needs a
            FlexActModule (or ``sample_errors`` or a ``criterion`` with ``reduction``).
        verify_z: The sign-test z, ``(n₊ − n₋) / √(n₊ + n₋)`` over the batch's samples where a
            candidate's error is lower (n₊) or higher (n₋) than the pick's, a switch needs.
        reset_optimizer: Whenever a layer commits, clear the state of every optimizer (Adam's
            moments, momentum) except that of the logits of layers still selecting: it was
            gathered for the mixture, and the committed network is another function
            (measured: benchmarks/RESULTS.md, "Fresh optimizer state").
    """

    def __init__(
        self,
        at: ClosedUnitInterval = 0.7,
        interval: Literal["step", "epoch"] = "step",
        total: PositiveInt | None = None,
        mode: Literal["fixed", "adaptive"] = "fixed",
        threshold: ClosedUnitInterval = 0.9,
        patience: PositiveInt = 3,
        min_fraction: ClosedUnitInterval = 0.2,
        check_every_n_steps: PositiveInt = 50,
        prune_below: ClosedUnitInterval | None = None,
        verify: bool = False,
        verify_z: PositiveFloat = 3.0,
        reset_optimizer: bool = False,
    ) -> None:
        self.at = check_fraction("SelectionCommit", "at", at)
        self.interval: Literal["step", "epoch"] = check_choice(
            "SelectionCommit", "interval", interval, ("step", "epoch"))
        self.total = None if total is None else check_positive_int("SelectionCommit", "total",
                                                                   total)
        self.mode = check_choice("SelectionCommit", "mode", mode, ("fixed", "adaptive"))
        self.threshold = check_fraction("SelectionCommit", "threshold", threshold)
        self.patience = check_positive_int("SelectionCommit", "patience", patience)
        self.min_fraction = check_fraction("SelectionCommit", "min_fraction", min_fraction)
        self._warmup = 0.0  # the model's selection_warmup, read at train start
        self._total: int | None = None  # this fit's run length, read at train start
        if self.min_fraction > self.at:
            raise ConfigError(f"SelectionCommit min_fraction ({min_fraction}) must not exceed at "
                              f"({at}): no layer could commit early")
        self.check_every_n_steps = check_positive_int("SelectionCommit", "check_every_n_steps",
                                                      check_every_n_steps)
        self.prune_below = (None if prune_below is None
                            else check_fraction("SelectionCommit", "prune_below", prune_below))
        self.verify = check_flag("SelectionCommit", "verify", verify)
        self.verify_z = check_z(verify_z)
        self.reset_optimizer = check_flag("SelectionCommit", "reset_optimizer", reset_optimizer)
        self.verdicts: dict[str, dict[str, Any]] = {}
        """Each checked layer's verdict (``verify``): the logits' pick, the chosen candidate,
        the mean error of every live candidate and each other one's sign-test z."""
        self.committed_steps: dict[str, int] = {}
        """Global step at which each layer (by its metric name) committed."""
        self.streaks: dict[str, int] = {}
        self.low_streaks: dict[str, dict[str, int]] = {}  # layer → candidate → checks below ε
        self.pruned: dict[str, list[str]] = {}  # layer → candidates dropped, in order
        self.committed = False  # every layer committed
        self.committed_at: int | None = None
        """Progress position (steps or epochs, per ``interval``) at which the last layer
        committed."""

    @property
    def state_key(self) -> str:
        if self.mode == "fixed":  # the key of earlier versions: their checkpoints keep loading
            return self._generate_state_key(at=self.at, interval=self.interval)
        return self._generate_state_key(at=self.at, interval=self.interval, mode=self.mode)

    # ----------------------------------------------------------------- decisions
    def _commit(self, trainer: L.Trainer, name: str, layer: FlexAct) -> None:
        layer.commit(True)
        step = self.committed_steps.setdefault(name, trainer.global_step)
        self.streaks.pop(name, None)
        for logger in trainer.loggers:
            logger.log_metrics({f"selection/{name}/committed_at": float(step)}, step=step)

    def _commit_layers(self, trainer: L.Trainer, pl_module: L.LightningModule,
                       named: list[tuple[str, FlexAct]], batch: Any) -> None:
        if self.verify:  # one check per set of layers sharing logits
            groups: dict[int, list[tuple[str, FlexAct]]] = {}
            for name, layer in named:
                groups.setdefault(id(layer.logits), []).append((name, layer))
            for group in groups.values():
                self._verify(trainer, pl_module, group, batch)
        for name, layer in named:
            self._commit(trainer, name, layer)
        if named and self.reset_optimizer:  # every rank commits at this step: states stay equal
            clear_state(trainer.optimizers, [layer.logits for _, layer in named_layers(pl_module)
                                             if not layer.committed])

    def _verify(self, trainer: L.Trainer, pl_module: L.LightningModule,
                group: list[tuple[str, FlexAct]], batch: Any) -> None:
        verdict = check_group(pl_module, group, batch, self.verify_z, trainer.strategy.reduce)
        if verdict is None:  # nothing to check
            return
        for name, layer in group:
            self.verdicts[name] = asdict(verdict)
            if verdict.chosen != verdict.pick:
                drop = [c for c in layer.live_names if c != verdict.chosen]
                layer.drop(drop)
                self.pruned.setdefault(name, []).extend(drop)

    def _settled_layers(self, open_layers: list[tuple[str, FlexAct]]) -> list[str]:
        """Update the streaks from one read of every open layer's probabilities; prune."""
        # Per layer: the weakest channel's top probability, then each candidate's largest one.
        rows = [torch.cat([probs.max(dim=-1).values.min().reshape(1),
                           probs.reshape(-1, probs.shape[-1]).max(dim=0).values])
                for probs in (layer.probabilities() for _, layer in open_layers)]
        values = torch.cat(rows).cpu().tolist()  # the one device-to-host copy of this check
        settled = []
        for name, layer in open_layers:
            top, candidate_max = values[0], values[1:1 + len(layer.candidate_names)]
            values = values[1 + len(layer.candidate_names):]
            self.streaks[name] = self.streaks.get(name, 0) + 1 if top >= self.threshold else 0
            if self.streaks[name] >= self.patience:
                settled.append(name)
            elif self.prune_below is not None:
                self._prune(name, layer, dict(zip(layer.candidate_names, candidate_max,
                                                  strict=True)))
        return settled

    def _prune(self, name: str, layer: FlexAct, probability: dict[str, float]) -> None:
        lows = self.low_streaks.setdefault(name, {})
        for candidate in layer.live_names:
            below = probability[candidate] < self.prune_below  # type: ignore[operator]
            lows[candidate] = lows.get(candidate, 0) + 1 if below else 0
        drop = [c for c in layer.live_names if lows[c] >= self.patience]
        if len(drop) == len(layer.live_names):  # the most probable stays
            drop.remove(max(drop, key=probability.__getitem__))
        if drop:
            layer.drop(drop)
            self.pruned.setdefault(name, []).extend(drop)
            for candidate in drop:
                lows.pop(candidate)

    def _check_due(self, trainer: L.Trainer, position: int, total: int) -> bool:
        """Whether this step is an adaptive check: past min_fraction and the warm-up, on time."""
        return (self.mode == "adaptive" and position >= self.min_fraction * total
                and position > self._warmup * total
                and trainer.global_step % self.check_every_n_steps == 0)

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule, start: bool,
               batch: Any = None) -> None:
        layers = named_layers(pl_module)
        if start:  # a resume, or a new run: bring every layer to the recorded state
            for name, layer in layers:
                gone = [c for c in self.pruned.get(name, []) if c in layer.live_names]
                if gone:
                    layer.drop(gone)
                layer.commit(name in self.committed_steps)
        total = self._run_length(trainer)
        position = progress_position(trainer, self.interval)
        open_layers = [(n, layer) for n, layer in layers if n not in self.committed_steps]
        if position >= self.at * total:
            # A check needs a batch: a run resumed past `at` commits at its first step instead
            if not (start and self.verify):
                self._commit_layers(trainer, pl_module, open_layers, batch)
        elif open_layers and not start and self._check_due(trainer, position, total):
            settled = set(self._settled_layers(open_layers))
            self._commit_layers(trainer, pl_module,
                                [(n, layer) for n, layer in open_layers if n in settled], batch)
        everything = bool(layers) and all(n in self.committed_steps for n, _ in layers)
        if everything and not self.committed:
            self.committed_at = position
        self.committed = everything

    def _run_length(self, trainer: L.Trainer) -> int:
        # Once per fit: Lightning recomputes estimated_stepping_batches on every access.
        if self._total is None:
            self._total = run_length(trainer, self.interval, self.total, "SelectionCommit")
        return self._total

    def check_warmup(self, pl_module: L.LightningModule) -> float:
        """Refuse a model whose selection warm-up lasts past this callback's latest commit.

        Returns:
            The model's ``selection_warmup`` (0 for a model without one).

        Raises:
            ConfigError: If every layer would commit before its logits ever moved.
        """
        warmup = getattr(getattr(pl_module, "selection", None), "warmup", 0.0)
        if warmup > 0 and self.at <= warmup:
            raise ConfigError(
                f"SelectionCommit commits at {self.at:g} of the run, but the selection logits "
                f"are held fixed until {warmup:g} (the model's selection_warmup): set "
                f"SelectionCommit at above {warmup:g}, or a smaller selection_warmup")
        return float(warmup)

    def check_module(self, pl_module: L.LightningModule) -> float:
        """:meth:`check_warmup`, and with ``verify`` :func:`check_verifiable`; the warm-up."""
        if self.verify:
            check_verifiable(pl_module)
        return self.check_warmup(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # No adaptive check or pruning while the logits are held fixed: a prior alone would decide.
        self._warmup = self.check_module(pl_module)
        if self.reset_optimizer:
            check_clearable("SelectionCommit", trainer.optimizers)
        self._total = None  # a new fit: its length is read again
        self._apply(trainer, pl_module, start=True)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Most steps decide nothing: skip the walk over the model's modules (a tenth of a
        # millisecond a step on a small model, paid by no fixed-activation run).
        total = self._run_length(trainer)
        position = progress_position(trainer, self.interval)
        if self.committed or (position < self.at * total
                              and not self._check_due(trainer, position, total)):
            return
        self._apply(trainer, pl_module, start=False, batch=batch)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"committed": self.committed, "committed_at": self.committed_at, "at": self.at,
                "interval": self.interval, "mode": self.mode,
                "committed_steps": dict(self.committed_steps), "streaks": dict(self.streaks),
                "low_streaks": {k: dict(v) for k, v in self.low_streaks.items()},
                "pruned": {k: list(v) for k, v in self.pruned.items()},
                "verdicts": dict(self.verdicts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.committed = state_dict.get("committed", self.committed)
        self.committed_at = state_dict.get("committed_at", self.committed_at)
        self.committed_steps = dict(state_dict.get("committed_steps", {}))
        self.streaks = dict(state_dict.get("streaks", {}))
        self.low_streaks = {k: dict(v) for k, v in state_dict.get("low_streaks", {}).items()}
        self.pruned = {k: list(v) for k, v in state_dict.get("pruned", {}).items()}
        self.verdicts = dict(state_dict.get("verdicts", {}))
        # A state written before per-layer steps existed has none: its layers commit again at
        # train start if the run is past `at`, as they did then.
