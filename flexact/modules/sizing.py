"""Sizes the network learns from the data: a lazily sized head gets one batch before training.

A backbone that does not tell its feature size gets a head whose first layer is an
``nn.LazyLinear``. Plain PyTorch sizes it at the first forward, but DDP refuses modules with
unsized parameters, so the module sizes it in ``setup``, before Lightning wraps it: from one
batch of the data module, taken from the validation (else test, predict, train) loader so that
no training shuffle is drawn, and prepared as the data module prepares every batch.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from flexact.errors import ConfigError
from flexact.nn import FlexActNetwork

__all__ = ["materialize_from_data"]

_LOADERS = ("val_dataloader", "test_dataloader", "predict_dataloader", "train_dataloader")


def materialize_from_data(model: FlexActNetwork, datamodule: L.LightningDataModule | None,
                          device: Any) -> None:
    """Size ``model``'s lazily sized layers from one batch of ``datamodule`` (if any needs it).

    Raises:
        ConfigError: If a layer needs a size and there is no data module to take a batch from.
    """
    if model.is_materialized():
        return
    batch = None if datamodule is None else _first_batch(datamodule)
    if batch is None:
        raise ConfigError("the backbone does not tell its feature size (no out_features "
                          "attribute) and no data module gives a batch to measure it: give the "
                          "backbone an `out_features` attribute, or set example_input_shape")
    batch = datamodule.on_after_batch_transfer(datamodule.transfer_batch_to_device(
        batch, device, 0), 0)
    model.materialize(batch[0] if isinstance(batch, (list, tuple)) else batch)


def _first_batch(datamodule: L.LightningDataModule) -> Any:
    for name in _LOADERS:
        try:
            loader = getattr(datamodule, name)()
        except (NotImplementedError, AttributeError, TypeError, RuntimeError):
            continue  # this loader is not defined (or its split is not set up) here
        for batch in loader:
            return batch
    return None
