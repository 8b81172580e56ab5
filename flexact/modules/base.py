"""``FlexActModule``: the template LightningModule that every flexact task builds on."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import Tensor, nn
from torchmetrics import MetricCollection

from flexact.activations import PAPER_CANDIDATES, is_activation_module
from flexact.callbacks.finite_guard import FiniteGuard
from flexact.callbacks.rng import RNGState
from flexact.errors import ConfigError
from flexact.layers import FlexAct, FlexActHead, flexact_layers, selection_kl
from flexact.surgery import Swap, swap_activations

try:  # Set by LightningCLI while it instantiates: then hparams hold configs, not modules.
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older or newer Lightning without the context variable
    _given_hyperparameters = None

__all__ = ["FlexActModule", "strip_classifier"]

_FEATURE_ATTRIBUTES = ("out_features", "num_features", "feature_dim", "embed_dim")


def strip_classifier(backbone: nn.Module) -> int | None:
    """Replace a torchvision model's final classifier by ``nn.Identity`` in place.

    Args:
        backbone: A model, e.g. ``torchvision.models.resnet18()``.

    Returns:
        The stripped layer's ``in_features``, or ``None`` if nothing was stripped (the model is
        not from torchvision, or has no recognizable final linear layer).
    """
    if not type(backbone).__module__.startswith("torchvision.models"):
        return None
    for attr in ("fc", "classifier", "head", "heads"):
        layer = getattr(backbone, attr, None)
        if isinstance(layer, nn.Linear):
            setattr(backbone, attr, nn.Identity())
            return layer.in_features
        if isinstance(layer, nn.Sequential) and len(layer) and isinstance(layer[-1], nn.Linear):
            in_features = layer[-1].in_features
            layer[-1] = nn.Identity()
            return in_features
    return None


def _unsaved_argument_names(frame: Any) -> list[str]:
    """Init arguments (of this class and subclasses) not to keep in ``hparams``.

    Modules are saved in the state dict already, and callables (optimizer factories) are code,
    which checkpoints loaded with ``weights_only=True`` must not contain.
    """
    if _given_hyperparameters is not None and _given_hyperparameters.get() is not None:
        return []  # LightningCLI passes the modules' configs, which are worth keeping
    init_args: dict[str, Any] = {}
    for local_args in collect_init_args(frame, [], classes=(HyperparametersMixin,)):
        init_args.update(local_args)
    return [name for name, value in init_args.items()
            if isinstance(value, nn.Module) or callable(value)]


class FlexActModule(L.LightningModule):
    """Base LightningModule: any backbone, a :class:`~flexact.FlexActHead`, loss = task + α·KL.

    Subclasses customize one hook instead of copying the training step:
    :meth:`configure_models` (build ``self.backbone`` and ``self.head``),
    :meth:`configure_losses` (set ``self.criterion``), :meth:`configure_metrics` (set
    ``self.train_metrics`` / ``val_metrics`` / ``test_metrics``).

    Args:
        backbone: Feature extractor: any ``nn.Module``, a torchvision model (its final classifier
            is stripped automatically), or ``None`` to feed raw features to the head.
        in_features: Size of the backbone's output features. Inferred when omitted: from the
            data module under the CLI, from a stripped torchvision classifier, from a backbone
            attribute ``out_features``/``num_features``/``feature_dim``/``embed_dim``, or by a dry
            run on ``example_input_shape``.
        num_outputs: Number of outputs (classes for classification, targets for regression);
            taken from the data module under the CLI; regression defaults to 1.
        hidden_features: Width of the FlexAct layer between two affine maps (FlexAct at the
            penultimate layer); ``None`` for a single affine map followed by FlexAct.
        candidates: Registry names of the candidate activations.
        tau: Initial Gumbel-Softmax temperature (a TemperatureAnnealing callback overrides it).
        hard: Straight-through one-hot selection in the forward pass.
        granularity: One selection per layer, or one per feature/channel.
        eval_mode: In eval, apply exactly the picked activation, or the softmax-weighted blend.
        prior: Initial selection probabilities, one per candidate; uniform if omitted.
        kl_lambda: Scale λ of the regularizer's pseudo-probabilities softmax(-ḡ/λ).
        alpha: Weight α of the selection KL in the loss; 0 disables the bias correction.
        optimizer: Optimizer factory called with the parameter groups.
        lr_scheduler: Optional learning-rate scheduler factory called with the optimizer.
        selection_weight_decay: Apply the optimizer's weight decay to selection logits and
            activation shape parameters too (off by default: decay would pull picks to uniform).
        example_input_shape: Shape of one input sample (without batch) for inferring
            ``in_features`` by a dry run of the backbone (and for per-channel swaps).
        mode: ``"gumbel"`` (FlexAct) or ``"blend"``: the noise-free softmax blend of Manessi &
            Rozza (2018), a baseline without a discrete pick (use ``eval_mode: expected``).
        swap_backbone: Also replace every activation module of the backbone by a FlexAct layer
            (FlexAct at every layer, beyond the paper's head); the regularizer and callbacks
            cover them all.
        sync_statistics: Under DDP, average the regularizer's gradient norms ḡ over all ranks
            before computing p̃ = softmax(-ḡ/λ), so N devices with batch B train exactly as one
            device with batch N·B (one small all-reduce per FlexAct layer and step; no effect on
            one device). Off: each rank's p̃ comes from its own batch, and DDP's gradient
            averaging makes the target the mean of the ranks' p̃ — the semantics of gradient
            accumulation over N micro-batches.
        kl_reduction: Combine the layers' KL terms by ``sum`` (the paper) or ``mean`` (keeps α's
            pull independent of depth; recommended with ``swap_backbone``).
        compile: Run the forward pass through ``torch.compile`` (FlexAct's training forward has no
            graph breaks); the state dict is unchanged.
        compile_backend: The ``torch.compile`` backend (``inductor``; ``aot_eager`` to debug).
        channels_last: Keep the backbone's weights and 4-D inputs in channels-last memory
            format (faster convolutions on GPUs with tensor cores).
        regularize_backbone: Apply the bias-correcting KL to FlexAct layers inside the backbone
            too; false restricts it to the head, as in the paper (in hidden layers it pulls every
            layer toward Sigmoid: see the teacher benchmark in benchmarks/RESULTS.md).

    Every run also gets a :class:`~flexact.callbacks.FiniteGuard` and an
    :class:`~flexact.callbacks.RNGState` (see :meth:`configure_callbacks`).
    """

    default_num_outputs: int | None = None
    """``num_outputs`` when neither the caller nor the data module gives one."""

    def __init__(
        self,
        backbone: nn.Module | None = None,
        in_features: PositiveInt | None = None,
        num_outputs: PositiveInt | None = None,
        hidden_features: PositiveInt | None = None,
        candidates: Sequence[str] = PAPER_CANDIDATES,
        tau: PositiveFloat = 1.0,
        hard: bool = False,
        granularity: Literal["layer", "channel"] = "layer",
        eval_mode: Literal["argmax", "expected"] = "argmax",
        prior: Sequence[PositiveFloat] | None = None,
        kl_lambda: PositiveFloat = 1.0,
        alpha: NonNegativeFloat = 0.3,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        selection_weight_decay: bool = False,
        example_input_shape: Sequence[PositiveInt] | None = None,
        mode: Literal["gumbel", "blend"] = "gumbel",
        swap_backbone: bool = False,
        sync_statistics: bool = True,
        kl_reduction: Literal["sum", "mean"] = "sum",
        compile: bool = False,
        compile_backend: str = "inductor",
        channels_last: bool = False,
        regularize_backbone: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=_unsaved_argument_names(inspect.currentframe()))
        self.num_outputs = num_outputs if num_outputs is not None else self.default_num_outputs
        if self.num_outputs is None or self.num_outputs < 1:
            raise ConfigError(
                f"num_outputs must be a positive int, got {num_outputs!r}: set it on the model, "
                "or give your data module a `num_outputs` attribute"
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.backbone = backbone
        self._compiled_forward: Any = None
        self.configure_models()
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.configure_losses()
        self.configure_metrics()
        for name, layer in flexact_layers(self):
            # Gradient norms are only needed where the KL term applies.
            in_backbone = name.startswith("backbone.")
            layer.regularize = self.hparams.alpha > 0 and (regularize_backbone or not in_backbone)
            layer.sync_statistics = bool(self.hparams.get("sync_statistics", True))
        self._anchored: list[nn.Parameter] = []

    # ----------------------------------------------------------------- overridable hooks
    def configure_models(self) -> None:
        """Build ``self.backbone`` (already set from the argument) and ``self.head``."""
        hp = self.hparams
        backbone = self.backbone if self.backbone is not None else nn.Identity()
        stripped = strip_classifier(backbone)
        in_features = hp.in_features or stripped or self._infer_features(backbone)
        self.backbone = backbone
        self.head = FlexActHead(
            in_features,
            self.num_outputs,
            hidden_features=hp.hidden_features,
            candidates=list(hp.candidates),
            tau=hp.tau,
            hard=hp.hard,
            granularity=hp.granularity,
            eval_mode=hp.eval_mode,
            prior=hp.prior,
            kl_lambda=hp.kl_lambda,
            mode=hp.mode,
        )
        if hp.swap_backbone:
            self.swaps = self._swap_backbone()

    def _swap_backbone(self) -> list[Swap]:
        hp = self.hparams
        example = None
        if hp.granularity == "channel":
            if not hp.example_input_shape:
                raise ConfigError("swap_backbone with granularity='channel' needs "
                                  "example_input_shape (one sample's shape)")
            example = torch.zeros(2, *hp.example_input_shape)
        swaps = swap_activations(
            self.backbone, candidates=list(hp.candidates), granularity=hp.granularity,
            example_input=example, tau=hp.tau, hard=hp.hard, eval_mode=hp.eval_mode,
            prior=hp.prior, kl_lambda=hp.kl_lambda, mode=hp.mode,
        )
        if not swaps:
            raise ConfigError("swap_backbone found no activation module in the backbone to "
                              "replace")
        return swaps

    def configure_losses(self) -> None:
        """Set ``self.criterion``, the task loss ``criterion(outputs, targets)``."""
        raise NotImplementedError("subclasses set self.criterion in configure_losses()")

    def configure_metrics(self) -> None:
        """Set ``self.train_metrics``, ``self.val_metrics`` and ``self.test_metrics``."""
        self.train_metrics = MetricCollection({})
        self.val_metrics = MetricCollection({})
        self.test_metrics = MetricCollection({})

    # ----------------------------------------------------------------- helpers
    def _infer_features(self, backbone: nn.Module) -> int:
        for attr in _FEATURE_ATTRIBUTES:
            value = getattr(backbone, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        shape = self.hparams.example_input_shape
        if shape:
            was_training = backbone.training
            backbone.eval()
            with torch.no_grad():
                features = backbone(torch.zeros(2, *shape))
            backbone.train(was_training)
            return int(features.flatten(1).shape[1])
        raise ConfigError(
            "cannot infer in_features: set model in_features, give the backbone an "
            "`out_features` attribute, or set example_input_shape (one sample's shape) so the "
            "backbone can be run once"
        )

    def forward(self, x: Tensor) -> Tensor:
        """Backbone features through the FlexAct head (compiled if ``compile`` is set)."""
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.hparams.compile:
            return self.features_to_outputs(x)
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(self.features_to_outputs,
                                                   backend=self.hparams.compile_backend)
        return self._compiled_forward(x)

    def features_to_outputs(self, x: Tensor) -> Tensor:
        """The uncompiled forward: ``head(backbone(x))``."""
        return self.head(self.backbone(x))

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
        if regularizer is not None:
            loss = task_loss + regularizer
            self.log("train_regularizer", regularizer, batch_size=batch_size)
            self.log("train_task_loss", task_loss, batch_size=batch_size)
        else:
            loss = task_loss
        on_step = stage == "train"
        # Under DDP, val/test losses are averaged over ranks (once per epoch), so a monitored
        # val_loss is the same on every rank; the training loss stays per rank (no per-step
        # collective). torchmetrics metrics synchronize themselves.
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=on_step, on_epoch=True,
                 batch_size=batch_size, sync_dist=stage != "train")
        metrics.update(self.metric_inputs(outputs), y)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        if stage == "train" and self._world_size() > 1:
            self._anchored = self._unused_selection_parameters()
            if self._anchored:
                loss = loss + 0.0 * sum(p.sum() for p in self._anchored)
        return loss

    def _world_size(self) -> int:
        trainer = getattr(self, "_trainer", None)
        return trainer.world_size if trainer is not None else 1

    def _unused_selection_parameters(self) -> list[nn.Parameter]:
        """Parameters that committed FlexAct layers leave out of the forward.

        A committed layer applies its pick only: its logits (and, per layer, the other
        candidates' parameters) get no gradient, which DDP treats as an error unless it searches
        the graph for unused parameters every step (``find_unused_parameters``). Adding them to
        the loss with weight 0 keeps plain DDP working; :meth:`on_after_backward` then drops
        their (zero) gradients so the optimizer leaves them untouched, as on one device.
        """
        unused: list[nn.Parameter] = []
        for _, layer in flexact_layers(self):
            if not layer.committed:
                continue
            unused.append(layer.logits)
            if layer.num_channels is None:  # per channel, every candidate is evaluated
                pick = layer.committed_index
                for j, candidate in enumerate(layer.candidates):
                    if j != pick:
                        unused.extend(candidate.parameters())
        return [p for p in unused if p.requires_grad]

    def on_after_backward(self) -> None:
        """Drop the zero gradients of parameters that only took part to satisfy DDP."""
        for param in self._anchored:
            param.grad = None
        self._anchored = []

    def configure_callbacks(self) -> list[Callback]:
        """Add a ``FiniteGuard`` and an ``RNGState`` unless the trainer already has them.

        They stop diverged runs with a clear message and make resumes and multi-device runs
        reproducible; configure them as trainer callbacks to change their arguments. Subclasses
        that override this hook should extend ``super().configure_callbacks()``.
        """
        trainer = getattr(self, "_trainer", None)
        present = trainer.callbacks if trainer is not None else []
        return [kind() for kind in (FiniteGuard, RNGState)
                if not any(isinstance(c, kind) for c in present)]

    def regularizer(self) -> Tensor | None:
        """The term added to the training loss: α·Σ KL(p̃ ‖ p) over every FlexAct layer.

        ``None`` when α = 0. Override to weight layers differently or add other penalties.
        """
        if self.hparams.alpha <= 0:
            return None
        return self.hparams.alpha * selection_kl(self, self.hparams.kl_reduction)

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

        Unless ``selection_weight_decay`` is set.
        """
        regular: list[nn.Parameter] = []
        selection: list[nn.Parameter] = []
        for module in self.modules():
            exempt = isinstance(module, FlexAct) or is_activation_module(module)
            for param in module.parameters(recurse=False):
                if param.requires_grad:
                    (selection if exempt else regular).append(param)
        if self.hparams.selection_weight_decay:
            return [{"params": regular + selection}]
        groups = [{"params": regular}, {"params": selection, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        """Build the injected optimizer (and scheduler, stepped per epoch)."""
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "monitor": "val_loss"},
        }
