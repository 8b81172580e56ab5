"""``RNGState``: one random stream shared by all ranks, saved in and restored from checkpoints."""

from __future__ import annotations

import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.callbacks import Callback

__all__ = ["RNGState", "collect_rng_states", "set_rng_states"]


def collect_rng_states() -> dict[str, Any]:
    """The states of the torch (CPU and current CUDA device), Python and NumPy generators.

    Only plain types and tensors, so checkpoints load with ``weights_only=True``.
    """
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device's generator only: each rank draws on its own device, and all
        # ranks' streams are equal (see RNGState), so rank 0's state is every rank's.
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore generator states from :func:`collect_rng_states` (missing entries are skipped)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        np_state = states["numpy"]
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32),
                             np_state["pos"], np_state["has_gauss"],
                             np_state["cached_gaussian"]))
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"].cpu())


class RNGState(Callback):
    """Make the Gumbel noise reproducible from the seed on any number of ranks and resumes.

    * **A stream that depends on the seed only.** At the start of fit the generators are
      re-seeded from ``seed_everything``'s seed (as Lightning's DDP strategy does on every
      rank), so the Gumbel noise does not depend on how many random numbers building the
      model drew, and one device draws the same noise as ``N``.
    * **One stream for all ranks.** Then rank 0's generator states and seed
      (``PL_GLOBAL_SEED``) are broadcast to every rank, so all ranks draw the same Gumbel noise
      at every step, whatever seed each process started with (e.g. ``seed_everything: true``
      picks a different random seed in each process that torchrun or SLURM starts), and
      Lightning's ``DistributedSampler`` shards with one seed. A step on ``N`` devices then
      draws the noise of the same step on one device with the ``N`` batches concatenated.
    * **Exact resume.** Checkpoints store the torch (CPU and CUDA), Python and NumPy generator
      states; a resumed run restores them right before its first training batch, so its noise
      continues the uninterrupted run's stream.

    Its one collective, the broadcast, runs in ``on_fit_start``, which every rank reaches with
    the same collectives before it (the progress bar reads no metrics there).

    The ``flexact`` command adds an ``RNGState()`` to every run (configured under
    ``rng_state:``); with a plain ``Trainer``, add it to ``callbacks``.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reset_seed()  # no-op without seed_everything
        if trainer.world_size <= 1:
            return
        shared = trainer.strategy.broadcast(
            {"seed": os.environ.get("PL_GLOBAL_SEED"), "states": collect_rng_states()}, src=0
        )
        if shared["seed"] is not None:
            os.environ["PL_GLOBAL_SEED"] = shared["seed"]
        set_rng_states(shared["states"])

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Restore as late as possible: whatever ran between the load and now (sanity check,
        # data loader start-up) must not shift the stream.
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None

    def state_dict(self) -> dict[str, Any]:
        # A checkpoint saved after a load but before the first batch keeps the loaded states.
        return {"rng": self._pending if self._pending is not None else collect_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")
