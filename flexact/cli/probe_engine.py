"""The Lightning side of ``flexact probe``: the config's model and data, and real fits."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flexact.errors import ConfigError
from flexact.nn.activations import PAPER_CANDIDATES
from flexact.nn.registry import get_activation
from flexact.probe.prior import candidate_key
from flexact.probe.results import Measurement
from flexact.probe.sites import activation_sites, with_activation

__all__ = ["ProbeTask", "default_metric", "fit_candidate", "higher_is_better"]

_LOWER_IS_BETTER = ("loss", "mse", "mae", "error", "perplexity")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of the logged metric is better (losses and errors: no)."""
    return not any(word in metric.lower() for word in _LOWER_IS_BETTER)


def default_metric(module: nn.Module) -> str:
    """``val_acc`` for classifiers (they log it), ``val_loss`` otherwise."""
    metrics = getattr(module, "val_metrics", None)
    names = list(metrics.keys()) if metrics is not None else []
    return "val_acc" if "val_acc" in names else "val_loss"


def _instantiate(cli_args: Sequence[str]) -> Any:
    from flexact.cli.app import build_cli

    return build_cli(list(cli_args), run=False)


class ProbeTask:
    """The config's module at initialization, one training batch, and its loss.

    Args:
        cli: A :class:`~flexact.cli.FlexActCLI` built with ``run=False``.
        seed: Seed of the weights' initialization per probe (all candidates share them).
        samples: Examples of the batch the features use (``None``: the whole batch); 32
            keep a ResNet18's five candidates under 30 s on two CPU cores.

    Raises:
        ConfigError: If the data gives no training batch or the model has no sites.
    """

    def __init__(self, cli: Any, seed: int = 0, samples: int | None = 32) -> None:
        from flexact.modules.sizing import materialize_from_data
        from flexact.nn.network import FlexActNetwork

        self.config = cli.config
        self.module, datamodule = cli.model, cli.datamodule
        self.seed = seed
        datamodule.prepare_data()
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()), None)
        if batch is None:
            raise ConfigError("the data module's training loader is empty; the probe needs "
                              "one batch")
        # As the Trainer would: image modules normalize (and augment) on the device.
        batch = datamodule.on_after_batch_transfer(
            datamodule.transfer_batch_to_device(batch, torch.device("cpu"), 0), 0)
        self.inputs, self.targets = batch[0][:samples], batch[1][:samples]
        if isinstance(self.module.model, FlexActNetwork):
            materialize_from_data(self.module.model, datamodule, torch.device("cpu"))
        self.network: nn.Module = self.module.model
        self.sites = activation_sites(self.network)

    @classmethod
    def from_cli(cls, cli_args: Sequence[str], seed: int = 0,
                 samples: int | None = 32) -> ProbeTask:
        """Instantiate the config (``--config ...`` and overrides, no subcommand)."""
        torch.manual_seed(seed)
        return cls(_instantiate(cli_args), seed, samples)

    def default_candidates(self) -> list[str]:
        """The config's FlexAct candidates (the paper's five if it names none)."""
        spec = getattr(self.module, "spec", None)
        return list(spec.candidates) if spec is not None else list(PAPER_CANDIDATES)

    def activation(self, name: str) -> nn.Module:
        """A fresh module of candidate ``name``."""
        return get_activation(name)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The module's task loss (mean over the batch)."""
        return self.module.criterion(outputs, self.module.targets_like(outputs, targets))

    def spectrum(self, name: str, bins: int) -> np.ndarray:
        """``(layers, bins)``: the Fisher spectrum histograms with ``name`` at every site."""
        from flexact.probe.fisher import fisher_features

        network = with_activation(self.network, name, self.sites)
        network.train()
        torch.manual_seed(self.seed)  # the same dropout masks for every candidate
        hist = fisher_features(network, self.inputs, self.targets, self.loss, bins=bins)
        return hist.numpy().reshape(-1, bins)

    def metric_name(self, metric: str | None) -> str:
        """The metric ``--train_top`` records: as given, else val_acc or val_loss."""
        return metric if metric is not None else default_metric(self.module)

    def higher_is_better(self, metric: str | None) -> bool:
        return higher_is_better(self.metric_name(metric))


def fit_candidate(cli_args: Sequence[str], candidate: str, root: Path,
                  metric: str | None = None) -> Measurement:
    """Fit the config with ``candidate`` at every site; its final logged metric.

    Raises:
        ConfigError: If the metric was not logged (the message lists those that were).
    """
    from flexact.callbacks.finite_guard import NonFiniteLossError

    cli = _instantiate([*cli_args, f"--trainer.default_root_dir={root}"])
    with_activation(cli.model.model, candidate, inplace=True)
    start = time.perf_counter()
    name = metric if metric is not None else default_metric(cli.model)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except NonFiniteLossError:
        value = 0.0 if higher_is_better(name) else float("inf")
    else:
        metrics = cli.trainer.callback_metrics
        if name not in metrics:
            raise ConfigError(f"metric {name!r} was not logged; logged: {sorted(metrics)} "
                              "(choose one with --metric)")
        value = float(metrics[name])
    if not np.isfinite(value):
        value = float(np.finfo(np.float32).max)  # a diverged run ranks last
    return Measurement(candidate, candidate_key(candidate), name, value, higher_is_better(name),
                       int(cli.trainer.global_step), time.perf_counter() - start)
