"""``FlexActModule``: the template LightningModule that every flexact task builds on."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection

from flexact.errors import ConfigError
from flexact.modules.hparams import MigratedCheckpoints, unsaved_argument_names
from flexact.modules.selection import SelectionSchedule, resolve_selection
from flexact.modules.sizing import materialize_from_data
from flexact.nn import FlexActNetwork, FlexActSpec, flexact_layers, selection_kl
from flexact.nn.params import parameter_groups, scale_selection_lr, unused_selection_parameters

__all__ = ["FlexActModule"]


class FlexActModule(MigratedCheckpoints, SelectionSchedule, L.LightningModule):
    """Base LightningModule: a :class:`~flexact.FlexActNetwork` as ``self.model``; task + α·KL.

    ``self.model`` is a plain ``nn.Module`` (backbone → FlexAct head): train it here, export it
    with ``flexact export``, or use it without Lightning. Subclasses customize one hook instead
    of copying the training step: :meth:`configure_models` (build ``self.model``),
    :meth:`configure_losses` (set ``self.criterion``), :meth:`configure_metrics` (set
    ``self.train_metrics`` / ``val_metrics`` / ``test_metrics``).

    Args:
        backbone: Feature extractor: any ``nn.Module``, a torchvision model (its final classifier
            is stripped automatically), or ``None`` to feed raw features to the head.
        in_features: Size of the raw features when ``backbone`` is ``None`` (taken from the
            data module under the CLI). A backbone tells its own size (``out_features`` …, a
            stripped torchvision classifier, a dry run on ``example_input_shape``), or the
            head's first layer is sized from one batch of the data module at setup.
        num_outputs: Classes or regression targets (from the data module under the CLI).
        hidden_features: Width of the FlexAct layer between two affine maps (FlexAct at the
            penultimate layer, as the paper); ``None`` for a single affine map followed by
            FlexAct; ``auto``: the task's default (:attr:`default_hidden_features`).
        flexact: The FlexAct settings (candidates, tau, kl_lambda, hard, granularity,
            eval_mode, prior, mode, compact_memory, candidate_kwargs) of the head, and of the
            backbone's swapped sites unless ``backbone_flexact`` is given.
        alpha: Weight α of the selection KL (the paper: 0.3; 0, the default, is off: measured
            against a sweep, it pulls picks toward Sigmoid; docs/method.md §5).
        optimizer: Optimizer factory called with the parameter groups.
        lr_scheduler: Optional scheduler factory called with the optimizer.
        selection_weight_decay: Decay selection logits and shapes too (off: decay pulls to uniform).
        selection_lr_scale: The selection logits' learning rate over the optimizer's when they
            start learning; default 5 for a FlexAct head (1 with a standardized gradient), 100
            with ``swap_backbone`` (the paper: 1, picks end near uniform; docs/method.md §5).
        example_input_shape: One input sample's shape, for a dry run of the backbone.
        swap_backbone: Also replace every activation module of the backbone by a FlexAct layer
            (FlexAct at every layer, beyond the paper's head).
        backbone_flexact: FlexAct settings of the swapped sites, if not ``flexact``'s.
        sync_statistics: Under DDP, average the gradient norms ḡ over all ranks before
            p̃ = softmax(-ḡ/λ): N devices with batch B train as one with batch N·B. Off: each
            rank's p̃ comes from its own batch (as with gradient accumulation).
        kl_reduction: Combine the layers' KL terms by ``sum`` (the paper) or ``mean`` (α's pull
            independent of depth).
        compile: Run the forward through ``torch.compile`` (backend: ``compile_backend``).
        channels_last: Backbone weights and 4-D inputs in channels-last memory format.
        regularize_backbone: Apply the KL to FlexAct layers inside the backbone too; false
            keeps it on the head, as in the paper (in hidden layers it pulls toward Sigmoid).
        share_selection: All FlexAct layers (head and swapped sites) share one set of logits:
            one activation for the whole network, the question a sweep answers; default on with
            ``swap_backbone`` (where the layers have the same candidates, per layer).
        selection_warmup: Fraction of training during which the selection logits stay fixed
            while the weights train; default 0 for a head, 0.3 with ``swap_backbone`` (layers
            that select from the first step drift to Identity; docs/method.md §5).
        selection_lr_scale_end: The logits' rate over the optimizer's at the run's end, reached
            geometrically from ``selection_lr_scale`` (after the warm-up); default 3000, slow
            early, decisive late (with alpha > 0: 300 for a head, constant everywhere); constant
            where only ``selection_lr_scale`` is given.

    The ``flexact`` command adds FiniteGuard and RNGState callbacks; a plain Trainer needs them.
    """

    default_num_outputs: int | None = None
    """``num_outputs`` when neither the caller nor the data module gives one."""
    default_hidden_features: int | Literal["same"] | None = None
    """``hidden_features: auto``: ``"same"`` (the feature size) puts FlexAct at the penultimate
    layer; ``None`` is the single-layer model."""

    def __init__(
        self,
        backbone: nn.Module | None = None,
        in_features: PositiveInt | None = None,
        num_outputs: PositiveInt | None = None,
        hidden_features: PositiveInt | Literal["auto"] | None = "auto",
        flexact: FlexActSpec = FlexActSpec(),  # noqa: B008 - frozen, so sharing it is safe
        alpha: NonNegativeFloat = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        selection_weight_decay: bool = False,
        selection_lr_scale: PositiveFloat | None = None,
        example_input_shape: Sequence[PositiveInt] | None = None,
        swap_backbone: bool = False,
        backbone_flexact: FlexActSpec | None = None,
        sync_statistics: bool = True,
        kl_reduction: Literal["sum", "mean"] = "sum",
        compile: bool = False,
        compile_backend: str = "inductor",
        channels_last: bool = False,
        regularize_backbone: bool = True,
        share_selection: bool | None = None,
        selection_warmup: NonNegativeFloat | None = None,
        selection_lr_scale_end: PositiveFloat | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=unsaved_argument_names(inspect.currentframe()))
        self.spec = FlexActSpec.build(flexact)
        self.backbone_spec = (None if backbone_flexact is None
                              else FlexActSpec.build(backbone_flexact))
        # Plain dicts in the hyper-parameters: checkpoints load with weights_only=True.
        self.hparams.update(flexact=self.spec.as_dict(), backbone_flexact=(
            None if self.backbone_spec is None else self.backbone_spec.as_dict()))
        self.num_outputs = num_outputs if num_outputs is not None else self.default_num_outputs
        if self.num_outputs is None or self.num_outputs < 1:
            raise ConfigError(
                f"num_outputs must be a positive int, got {num_outputs!r}: set it on the model, "
                "or give your data module a `num_outputs` attribute"
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        # Not a submodule of its own: configure_models puts it into self.model.
        object.__setattr__(self, "_backbone_argument", backbone)
        self._compiled_forward: Any = None
        self.configure_models()
        if "model" not in self._modules:  # a subclass written for flexact 0.1 set these two
            backbone, head = (self._modules.pop(k, None) for k in ("backbone", "head"))
            if head is None:
                raise ConfigError(f"{type(self).__name__}.configure_models must set self.model "
                                  "(e.g. a flexact.FlexActNetwork(backbone, head))")
            self.model = FlexActNetwork(backbone, head)
        if channels_last:
            self.model.backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.selection = resolve_selection(self.model, swap_backbone, selection_lr_scale,
                                           share_selection, selection_warmup,
                                           selection_lr_scale_end, alpha)
        self.hparams.update(self.selection.as_hparams())  # the values used, as saved
        self.configure_losses()
        self.configure_metrics()
        for name, layer in flexact_layers(self.model):
            # Gradient norms are only needed where the KL term applies.
            in_backbone = name.startswith("backbone.")
            layer.regularize = alpha > 0 and (regularize_backbone or not in_backbone)
            layer.sync_statistics = bool(sync_statistics)
        self._anchored: list[nn.Parameter] = []

    @property
    def backbone(self) -> nn.Module:
        """The network's feature extractor (``self.model.backbone``)."""
        return self.model.backbone

    @property
    def head(self) -> nn.Module:
        """The network's FlexAct head (``self.model.head``)."""
        return self.model.head

    # ----------------------------------------------------------------- overridable hooks
    def configure_models(self) -> None:
        """Build ``self.model``: the backbone argument followed by a FlexAct head.

        Overrides set ``self.model`` (any ``nn.Module``; a :class:`~flexact.FlexActNetwork`
        keeps ``backbone``/``head`` reachable); setting ``self.backbone`` and ``self.head``
        instead, as flexact 0.1 asked, still works.
        """
        hp = self.hparams
        self.model = FlexActNetwork.build(
            self._backbone_argument, self.num_outputs, in_features=hp.in_features,
            hidden_features=(self.default_hidden_features if hp.hidden_features == "auto"
                             else hp.hidden_features), spec=self.spec,
            swap_backbone=hp.swap_backbone, backbone_spec=self.backbone_spec,
            example_input_shape=hp.example_input_shape,
        )

    def configure_losses(self) -> None:
        """Set ``self.criterion``, the task loss ``criterion(outputs, targets)``."""
        raise NotImplementedError("subclasses set self.criterion in configure_losses()")

    def configure_metrics(self) -> None:
        """Set ``self.train_metrics``, ``self.val_metrics`` and ``self.test_metrics``."""
        self.train_metrics = MetricCollection({})
        self.val_metrics = MetricCollection({})
        self.test_metrics = MetricCollection({})

    def forward(self, x: Tensor) -> Tensor:
        """``self.model(x)`` (compiled if ``compile`` is set)."""
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.hparams.compile:
            return self.model(x)
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(self.model.forward,
                                                   backend=self.hparams.compile_backend)
        return self._compiled_forward(x)

    def targets_like(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Adapt targets to the outputs' layout before the loss (identity by default)."""
        return targets

    def _shared_step(self, batch: Any, stage: str, metrics: MetricCollection) -> Tensor:
        x, y = batch
        outputs = self(x)
        y = self.targets_like(outputs, y)
        task_loss = self.criterion(outputs, y)
        batch_size = x.shape[0]
        regularizer = self.regularizer() if stage == "train" else None
        loss = task_loss if regularizer is None else task_loss + regularizer
        if regularizer is not None:
            self.log_dict({"train_regularizer": regularizer, "train_task_loss": task_loss},
                          batch_size=batch_size)
        # DDP: val/test sync at the loop's end (every rank), training metrics in on_train_epoch_end
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True,
                 batch_size=batch_size, sync_dist=stage != "train")
        metrics.update(self.metric_inputs(outputs), y)
        if stage != "train":
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        if stage == "train" and getattr(self._trainer, "world_size", 1) > 1:
            self._anchored = unused_selection_parameters(self.model)
            if self._anchored:
                loss = loss + 0.0 * sum(p.sum() for p in self._anchored)
        return loss

    def on_train_epoch_end(self) -> None:
        """Log the training metrics, synchronized here: docs/distributed.md (overrides: super())."""
        for name, metric in self.train_metrics.items():
            metric.compute()  # all ranks at one point; Lightning's compute() reads the cached value
            self.log(name, metric)

    def on_after_backward(self) -> None:
        """Drop the zero gradients of parameters that only took part to satisfy DDP."""
        for param in self._anchored:
            param.grad = None
        self._anchored = []

    def setup(self, stage: str) -> None:
        """Size a lazily sized head from one batch of the data module (before DDP wraps it)."""
        if isinstance(self.model, FlexActNetwork):
            materialize_from_data(self.model, self.trainer.datamodule, self.device)

    def regularizer(self) -> Tensor | None:
        """The term added to the training loss: α·Σ KL(p̃ ‖ p) over every FlexAct layer.

        ``None`` when α = 0. Override to weight layers differently or add other penalties.
        """
        if self.hparams.alpha <= 0:
            return None
        return self.hparams.alpha * selection_kl(self.model, self.hparams.kl_reduction)

    def metric_inputs(self, outputs: Tensor) -> Tensor:
        """Transform model outputs before they reach the metrics (identity by default)."""
        return outputs

    # ----------------------------------------------------------------- Lightning hooks
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Task loss plus α times the selection KL of every FlexAct layer."""
        return self._shared_step(batch, "train", self.train_metrics)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation loss and metrics (FlexAct layers apply their eval mode)."""
        self._shared_step(batch, "val", self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Test loss and metrics."""
        self._shared_step(batch, "test", self.test_metrics)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Predictions for a batch ``x`` or ``(x, y)``."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.predictions(self(x))

    def predictions(self, outputs: Tensor) -> Tensor:
        """Turn model outputs into predictions (identity by default)."""
        return outputs

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups: selection logits and activation shapes get no weight decay.

        Unless ``selection_weight_decay`` is set (:func:`flexact.nn.params.parameter_groups`).
        """
        return parameter_groups(self, self.hparams.selection_weight_decay)

    def configure_optimizers(self) -> Any:
        """Build the injected optimizer (and scheduler, stepped per epoch)."""
        optimizer = self.optimizer_factory(self.parameter_groups())
        scale_selection_lr(optimizer, self.selection.lr_scale)  # before the scheduler
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "monitor": "val_loss"},
        }
