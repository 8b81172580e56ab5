"""``FiniteGuard``: stop on a NaN/inf loss, say where and why, never checkpoint a broken model."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from flexact.errors import ConfigError
from flexact.nn import flexact_layers
from flexact.nn.params import LR_SCALE_KEY

__all__ = ["FiniteGuard", "NonFiniteLossError"]

_NONE = 2**62  # "no bad batch yet"; larger than any batch code
_SMALL_TAU = 0.05  # below this, 1/τ-sized Gumbel-Softmax gradients are a likely cause


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or parameters (raised by :class:`FiniteGuard`).

    The message names the step, the likely causes, and the last checkpoint written before.
    """


def _floating_leaves(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch] if batch.is_floating_point() else []
    if isinstance(batch, Mapping):
        return [t for value in batch.values() for t in _floating_leaves(value)]
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return [t for value in batch for t in _floating_leaves(value)]
    return []


class FiniteGuard(Callback):
    """Stop training when the loss becomes NaN or infinite, with a message that says why.

    Every training batch records, on the device and without waiting for it, whether its loss
    (and, with ``check_inputs``, its floating-point inputs and targets) are finite. The host
    reads the record only every ``check_every_n_steps`` batches, at the last batch of every
    epoch, before validation, and at the end of training: a check per step would make the host
    wait for the device every step. The step in the message is still exact, since the record
    keeps the first bad batch; the cost of a larger interval is only that a diverged run
    computes up to that many more useless steps before stopping. A check with no training
    batch since the previous one is skipped (the same decision on every rank).

    Before every checkpoint is written, the record and the parameters are checked as well, so
    a checkpoint is never written from a diverged model: the last checkpoint on disk stays the
    last good one. Under DDP every check is one small all-reduce, and all ranks stop at the
    same check with the same message (no rank is left waiting in a collective).

    The all-reduce only runs in hooks that every rank reaches with the same collectives before
    it, whatever the callback order: ``on_train_batch_end``, ``on_validation_start``,
    ``on_train_end`` and ``on_save_checkpoint``. Never in ``on_train_epoch_end``: there
    Lightning's progress bar, on rank 0 only, computes the epoch's metrics, and a metric that
    synchronizes itself (a torchmetrics all-gather, ``sync_dist=True``) would cross the
    all-reduce of the other ranks, a deadlock.

    The ``flexact`` command adds a ``FiniteGuard()`` to every run (configured under
    ``finite_guard:``); with a plain ``Trainer``, add it to ``callbacks``.

    Args:
        check_every_n_steps: Read the record every this many training batches.
        check_inputs: Also record non-finite values in each batch's floating-point tensors,
            so the message can blame bad data (one reduction per tensor per batch).
    """

    def __init__(self, check_every_n_steps: PositiveInt = 10, check_inputs: bool = True) -> None:
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) \
                or check_every_n_steps < 1:
            raise ConfigError("FiniteGuard check_every_n_steps must be a positive int, got "
                              f"{check_every_n_steps!r}")
        self.check_every_n_steps = int(check_every_n_steps)
        self.check_inputs = bool(check_inputs)
        self._reset()

    def _reset(self) -> None:
        # codes (batch counter · world size + rank) of the first batch with a non-finite loss,
        # and of the first with non-finite inputs; _NONE if none yet
        self._first: Tensor | None = None
        self._value: Tensor | None = None  # the first non-finite loss value
        self._batches = 0
        self._checked = 0  # self._batches at the last check
        self._where: dict[int, tuple[int, int, int]] = {}  # counter → (step, epoch, batch)

    # ------------------------------------------------------------------ recording
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._where[self._batches] = (trainer.global_step, trainer.current_epoch, batch_idx)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        counter = self._batches
        self._batches += 1
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            self._record(loss.detach(), batch, counter * trainer.world_size + trainer.global_rank)
        if self._batches % self.check_every_n_steps == 0 or _last_batch(trainer, batch_idx):
            self.check(trainer, pl_module)

    def _record(self, loss: Tensor, batch: Any, code: int) -> None:
        device = loss.device
        if self._first is None:
            self._first = torch.full((2,), _NONE, dtype=torch.long, device=device)
            self._value = torch.zeros((), dtype=torch.float32, device=device)
        assert self._value is not None
        loss_bad = ~torch.isfinite(loss).all()
        input_bad = torch.zeros((), dtype=torch.bool, device=device)
        if self.check_inputs:
            for tensor in _floating_leaves(batch):
                input_bad = input_bad | ~torch.isfinite(tensor).all().to(device)
        new = torch.stack([loss_bad, input_bad]) & (self._first == _NONE)
        self._value = torch.where(new[0], loss.float().reshape(-1)[0], self._value)
        self._first = torch.where(new, torch.full_like(self._first, code), self._first)

    # ------------------------------------------------------------------ checks
    # No check in on_train_epoch_end: see the class docstring (the epoch's last batch is
    # checked in on_train_batch_end instead).
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.check(trainer, pl_module)  # no validation (or checkpoint) of a diverged model

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Raising here aborts the save before anything is written.
        self.check(trainer, pl_module, parameters=True)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule,
              parameters: bool = False) -> None:
        """Read the record (one host sync; one all-reduce under DDP) and stop if it is bad.

        Args:
            trainer: The trainer.
            pl_module: The module being trained.
            parameters: Also check that every parameter is finite.

        Raises:
            NonFiniteLossError: If a loss so far, or (with ``parameters``) a parameter, is not
                finite.
        """
        if not parameters and self._batches == self._checked:
            return  # nothing new since the last check (the same on every rank: no collective)
        self._checked = self._batches
        bad_parameters: list[str] = []
        if parameters:
            named = [(n, p) for n, p in pl_module.named_parameters() if p.numel()]
            if named:
                flags = torch.stack([~torch.isfinite(p.detach()).all() for _, p in named])
                bad_parameters = [n for (n, _), bad in zip(named, flags.tolist(), strict=True)
                                  if bad]
        record = torch.full((3,), _NONE, dtype=torch.long, device=pl_module.device)
        if self._first is not None:
            record[:2] = self._first
        if bad_parameters:
            record[2] = 0
        if trainer.world_size > 1:  # every rank decides alike (even with sharded parameters)
            record = trainer.strategy.reduce(record, reduce_op="min")
        loss_code, input_code, parameter_code = (int(v) for v in record.tolist())
        if loss_code == _NONE and parameter_code == _NONE:
            self._where.clear()  # all good so far: the places of past batches are not needed
            return
        if parameter_code != _NONE and not bad_parameters:
            bad_parameters = ["(on another rank)"]
        raise NonFiniteLossError(
            self._message(trainer, pl_module, loss_code, input_code, bad_parameters)
        )

    # ------------------------------------------------------------------ the message
    def _place(self, code: int, world_size: int) -> str:
        counter, rank = divmod(code, world_size)
        step, epoch, batch = self._where.get(counter, (-1, -1, -1))
        where = f"step {step} (epoch {epoch}, batch {batch}" if step >= 0 else "a recent step ("
        return where + (f", rank {rank})" if world_size > 1 else ")")

    def _message(self, trainer: L.Trainer, pl_module: L.LightningModule, loss_code: int,
                 input_code: int, bad_parameters: list[str]) -> str:
        world = trainer.world_size
        if loss_code != _NONE:
            local = self._first is not None and int(self._first[0]) == loss_code
            value = f" ({float(self._value)})" if local and self._value is not None else ""
            head = f"the training loss is not finite{value} at {self._place(loss_code, world)}"
        else:
            head = (f"parameters became NaN or infinite by step {trainer.global_step}: "
                    + ", ".join(bad_parameters[:5]) + (" ..." if len(bad_parameters) > 5 else ""))
        causes: list[str] = []
        if input_code != _NONE and input_code // world <= loss_code // world:  # same step or before
            causes.append(f"bad inputs: the batch at {self._place(input_code, world)} contains "
                          "NaN or inf values (check the data and its preprocessing)")
        taus = [layer.tau for _, layer in flexact_layers(pl_module)]
        if taus and min(taus) < _SMALL_TAU:
            causes.append(f"τ too small (τ = {min(taus):.3g}; Gumbel-Softmax scores and "
                          "gradients grow like 1/τ): raise the model's tau or "
                          "TemperatureAnnealing's end")
        # The optimizer's rate: the selection logits' group runs at selection_lr_scale × it.
        lrs = [group["lr"] / group.get(LR_SCALE_KEY, 1.0) for opt in trainer.optimizers
               for group in opt.param_groups if isinstance(group.get("lr"), (int, float))]
        if lrs:
            causes.append(f"learning rate too high (lr = {max(lrs):.3g}): lower the optimizer's "
                          "lr or clip gradients (trainer.gradient_clip_val)")
        if str(trainer.precision).startswith("16"):
            causes.append(f"float16 overflow (precision {trainer.precision}): use bf16-mixed or "
                          "32-true")
        if loss_code != _NONE and bad_parameters:
            causes.append("non-finite parameters now: " + ", ".join(bad_parameters[:5]))
        causes = causes or ["a numerically unstable model or loss (try gradient clipping)"]
        text = f"training stopped: {head}. Likely causes: " + "; ".join(causes) + ". "
        last = _last_checkpoint(trainer)
        text += (f"The last checkpoint, written before the failure, is intact: {last}"
                 if last else "No checkpoint was written before the failure")
        return text


def _last_batch(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether ``batch_idx`` is the last training batch of the epoch (alike on every rank)."""
    if batch_idx + 1 >= trainer.num_training_batches:
        return True
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def _last_checkpoint(trainer: L.Trainer) -> str | None:
    """The most recently written checkpoint file of the trainer's checkpoint callbacks."""
    paths = set()
    for callback in trainer.checkpoint_callbacks:
        for attr in ("_last_checkpoint_saved", "last_model_path", "best_model_path"):
            path = getattr(callback, attr, "")
            if path and os.path.isfile(path):
                paths.add(path)
    return max(paths, key=os.path.getmtime) if paths else None
