"""One FlexAct run against a sweep of fixed-activation runs: does it find what the sweep finds?

The product's promise: one FlexAct run picks the activation a sweep over the paper's five
candidates would pick, at about one run's cost. Per task and seed this script trains the sweep
(one run per candidate, the same recipe and number of epochs) and the FlexAct runs, each its own
``Trainer.fit``, interleaved so that the noise of this shared machine hits both alike, and times
every fit separately.

Tasks:

- ``synthetic-<truth>``: ``y = a(5·x₁)`` (``SyntheticDataModule``, docs/method.md §3.1), the
  recipe of configs/synthetic.yaml (``FlexActRegressor``, no backbone, Linear 4→1 → FlexAct,
  Adam 0.05, batch 64, λ = 0.3, τ 1 → 0.2 per step) on fewer samples and epochs (2 048 training
  samples, 15 epochs: 480 steps instead of 1 280).
- ``teacher-d<depth>-<activation>``: binary labels of a random sigmoid or ReLU teacher with 1 or
  8 hidden layers of 10 units (``TeacherDataModule``, §4); ``FlexActClassifier`` with an
  ``MLP`` backbone of ``depth − 1`` hidden layers and the head ``Linear 10→10 → act → Linear 10→2``,
  so the student has the teacher's depth (the recipe of benchmarks/teacher.py: Adam 0.01, batch
  128, λ = 0.3, τ 1 → 0.2 per step, 20 epochs) on 6 000 examples instead of 10 000.

- ``digits-lenet5``: scikit-learn's digits written as MNIST idx files (1 500 train / 297 test,
  flexact/tools/digits.py) and read by ``MNISTDataModule`` (torchvision's ``MNIST``); LeNet5 with
  6 and 16 maps and the head ``Linear 256→84 → act → Linear 84→10``; Adam 3e-3, batch 64,
  12 epochs.
- ``text-cnn``: 2 000 reviews written as review polarity v2.0 folders (``txt_sentoken``) and read
  by ``TextDataModule``: 30 words each, three sentiment words, each of the review's polarity with
  probability 0.7 (flexact/tools/fake_data.py), 20 % test; a TextCNN (32-dim embeddings, filters
  of widths 3 and 5, 16 each) and the head ``Linear 32→16 → act → Linear 16→2``; Adam 3e-3,
  batch 50, 8 epochs.

Runs:

- sweep member ``a``: the same module with ``flexact={"candidates": [a]}`` in the head and the
  backbone's ``activation=a``; where the backbone has activation sites also ``head:a``, the
  activation in the head only and ReLU in the backbone (the sweep head-only FlexAct answers).
  Its one-candidate head is committed before training (it computes
  exactly ``a``, as a plain activation module would) and its α is 0 (the KL of a one-candidate
  layer is 0): the cheapest fixed-activation run, so the time ratios are conservative.
- FlexAct ``head`` (:data:`HEAD_VARIANTS`): the five candidates in the head; the backbone keeps its
  default ReLU. The variants differ in α (the paper's 0.3, 0.1, 0), the selection logits' learning
  rate over the weights' (``selection_lr_scale`` 1, 5, 10, 30, and the default: growing to 3000 over
  the run, ``selection_lr_scale_end``, from 1 for a head whose selection gradient is standardized,
  from 5 for a raw one; earlier defaults grew to 300), straight-through hard samples, logits held
  fixed for the first 30 % of the run (``select_after``), an absolute selection learning rate (0.1,
  0.3, whatever the weights' rate) and the selection gradient taken against standardized candidate
  outputs (``selection_gradient="standardized"``), initial probabilities in which the twins
  ReLU and LeakyReLU split one share (:data:`TWIN_PRIOR`, heads and everywhere), and the
  optimizer's state cleared at each commit (``SelectionCommit(reset_optimizer=True)``, heads
  and everywhere).
- FlexAct ``everywhere`` (:data:`EVERYWHERE_VARIANTS`; tasks whose backbone has activation
  sites: teacher depth 8, digits, text): ``swap_backbone=True``; α = 0.3 with
  ``kl_reduction="mean"``, α = 0.3 on the head only (``regularize_backbone=False`` with
  ``kl_reduction="sum"``, i.e. the head's own KL: "mean" divides by every FlexAct layer,
  regularized or not), α = 0, each with the selection learning-rate variants above, one
  selection shared by every layer (``share_selection``) and the standardized gradient (also on
  the default's schedule); the default shares one selection, holds it for 30 % of the run, then
  grows ×100 → ×3000.
- Every FlexAct run has ``TemperatureAnnealing(1 → 0.2)`` and ``SelectionCommit(mode="adaptive",
  threshold=0.9, patience=3, min_fraction=0.2, check_every_n_steps=20, prune_below=0.02,
  at=0.7)``; the defaults also check each pick at its commit (``verify=True``) and clear the
  optimizer's state there (``reset_optimizer=True``); sweep members
  have the same annealing (a no-op for them).

Metric: test MSE (synthetic, lower is better) or test accuracy in % (teacher, higher is better),
of the model in eval mode (FlexAct applies exactly its picks). The sweep's best activation is the
one with the best mean test metric over seeds.

Usage: ``python benchmarks/sweep.py [--seeds 3] [--first-seed 0] [--epochs N] [--tasks synthetic
teacher image text ...] [--variants TEXT ...] [--clear-member-state F] [--threads 1]
[--no-write] [--smoke]`` (about 40
minutes on this shared 2-core machine with every variant; ``--variants`` picks some).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from flexact.backbones import MLP, LeNet5, TextCNN
from flexact.callbacks import SelectionCommit, TemperatureAnnealing
from flexact.callbacks._optimizer_state import clear_state
from flexact.callbacks.selection_summary import named_layers
from flexact.datamodules import MNISTDataModule, SyntheticDataModule, TextDataModule
from flexact.datamodules.teacher import TeacherDataModule
from flexact.modules import FlexActClassifier, FlexActRegressor
from flexact.tools.digits import write_digits_mnist
from flexact.tools.fake_data import write_review_polarity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # sibling scripts, not a package

CANDIDATES = ["relu", "sigmoid", "tanh", "leaky_relu", "identity"]  # the paper's five
HEAD = "head:"  # sweep members with the activation in the head only (the backbone keeps ReLU)
HEAD_LABEL = " (head only)"  # suffix of the task name in the head-only sweep's rows and cells
KL_LAMBDA = 0.3
DECISIVE = 0.9  # a layer is decisive when its top selection probability is at least this
NOISE_FACTOR = 2.0  # within noise: |sweep mean(pick) − sweep mean(best)| ≤ 2 × std(best)
COMMIT = {"mode": "adaptive", "threshold": 0.9, "patience": 3, "min_fraction": 0.2,
          "check_every_n_steps": 20, "prune_below": 0.02, "at": 0.7}


# Uniform over the four distinct functions, not the five names: ReLU and its twin LeakyReLU
# (slope 0.01 below 0) split one share, so the first mixture is not 40 % ReLU-like.
TWIN_PRIOR = (0.125, 0.25, 0.25, 0.125, 0.25)  # relu, sigmoid, tanh, leaky_relu, identity


@dataclass(frozen=True)
class Variant:
    """One FlexAct run per task and seed."""

    name: str
    alpha: float
    everywhere: bool = False
    regularize_backbone: bool = True
    kl_reduction: str = "mean"
    # None: the module's default for the run's mode (head only or everywhere)
    selection_lr_scale: float | None = 10.0  # the logits' learning rate over the weights'
    hard: bool = False  # straight-through one-hot samples (GDAS-style)
    select_after: float | None = 0.0  # selection_warmup: logits fixed for this fraction
    shared: bool | None = False  # one selection for every layer (share_selection)
    selection_lr: float | None = None  # the logits' own learning rate (replaces the scale)
    selection_lr_scale_end: float | None = None  # None: the module's rule (constant if given)
    # "standardized" (equal footing), "raw", or "auto" (the default: standardized in a
    # head-only head before an affine map, raw elsewhere)
    selection_gradient: str = "raw"
    verify: bool = False  # SelectionCommit(verify=True): each pick checked at its commit
    prior: tuple[float, ...] | None = None  # initial selection probabilities (flexact.prior)
    reset: bool = False  # SelectionCommit(reset_optimizer=True): fresh optimizer state at commit


HEAD_VARIANTS = [
    Variant("head, α=0.3, selection lr ×1 (the paper)", 0.3, selection_lr_scale=1.0),
    Variant("head, α=0, selection lr ×1", 0.0, selection_lr_scale=1.0),
    Variant("head, α=0.3, selection lr ×10", 0.3),
    Variant("head, α=0.1, selection lr ×10", 0.1),
    Variant("head, α=0, selection lr ×1 → ×3000 standardized before an affine map, else ×5 → "
            "×3000 raw, picks checked at commit (the default before the optimizer restart)",
            0.0, selection_lr_scale=None, select_after=None, selection_gradient="auto",
            verify=True),
    Variant("head, α=0, selection lr ×1 → ×3000 standardized before an affine map, else ×5 → "
            "×3000 raw (the default until the check)", 0.0, selection_lr_scale=None,
            select_after=None, selection_gradient="auto"),
    Variant("head, α=0, selection lr ×1 → ×3000 standardized before an affine map, else ×5 → "
            "×3000 raw, picks checked at commit, fresh optimizer state at commit (flexact's "
            "default)", 0.0,
            selection_lr_scale=None, select_after=None, selection_gradient="auto", verify=True,
            reset=True),
    Variant("head, α=0, selection lr ×1 → ×3000 standardized before an affine map, else ×5 → "
            "×3000 raw, picks checked at commit, twins share a prior's share", 0.0,
            selection_lr_scale=None, select_after=None, selection_gradient="auto", verify=True,
            prior=TWIN_PRIOR),
    Variant("head, α=0, selection lr ×1 → ×300 standardized before an affine map, else ×5 → "
            "×300 raw (the default until ×3000)", 0.0, selection_lr_scale=None,
            selection_lr_scale_end=300.0, select_after=None, selection_gradient="auto"),
    Variant("head, α=0, selection lr ×5 → ×300, standardized before an affine map (the "
            "default until the ×1 start)", 0.0, selection_lr_scale=5.0,
            selection_lr_scale_end=300.0, select_after=None, selection_gradient="auto"),
    Variant("head, α=0, selection lr ×5 → ×300 (the previous default)", 0.0,
            selection_lr_scale=5.0, selection_lr_scale_end=300.0, select_after=None),
    Variant("head, α=0, selection lr ×10 (the earlier default)", 0.0),
    Variant("head, α=0, selection lr ×5", 0.0, selection_lr_scale=5.0),
    Variant("head, α=0, selection lr ×30", 0.0, selection_lr_scale=30.0),
    Variant("head, α=0, hard, selection lr ×10", 0.0, hard=True),
    Variant("head, α=0, selection lr ×30 after 30 %", 0.0, selection_lr_scale=30.0,
            select_after=0.3),
    Variant("head, α=0, selection lr ×100 after 30 %", 0.0, selection_lr_scale=100.0,
            select_after=0.3),
    Variant("head, α=0, selection lr 0.1", 0.0, selection_lr=0.1),
    Variant("head, α=0, selection lr 0.3", 0.0, selection_lr=0.3),
    Variant("head, α=0, standardized, selection lr ×10", 0.0, selection_gradient="standardized"),
    Variant("head, α=0, standardized, selection lr 0.1", 0.0, selection_gradient="standardized",
            selection_lr=0.1),
]
EVERYWHERE_DEFAULT = Variant(
    "everywhere, shared, α=0, selection lr ×100 → ×3000 after 30 %, picks checked at commit, "
    "fresh optimizer state at commit (flexact's default)", 0.0, everywhere=True, shared=None,
    selection_lr_scale=None, select_after=None, selection_gradient="auto", verify=True,
    reset=True)
EVERYWHERE_VARIANTS = [
    Variant("everywhere, α=0.3 (mean KL), selection lr ×1", 0.3, everywhere=True,
            selection_lr_scale=1.0),
    # "sum": the head's own KL; "mean" would divide it by all layers, regularized or not.
    Variant("everywhere, α=0.3 on the head only, selection lr ×1", 0.3, everywhere=True,
            regularize_backbone=False, kl_reduction="sum", selection_lr_scale=1.0),
    Variant("everywhere, α=0, selection lr ×1", 0.0, everywhere=True, selection_lr_scale=1.0),
    Variant("everywhere, α=0.3 on the head only, selection lr ×10", 0.3, everywhere=True,
            regularize_backbone=False, kl_reduction="sum"),
    Variant("everywhere, α=0, selection lr ×10 (the earlier default)", 0.0, everywhere=True),
    Variant("everywhere, shared, α=0, selection lr ×100 → ×3000 after 30 %, picks checked at "
            "commit (the default before the optimizer restart)", 0.0, everywhere=True,
            shared=None, selection_lr_scale=None, select_after=None, selection_gradient="auto",
            verify=True),
    Variant("everywhere, shared, α=0, selection lr ×100 → ×3000 after 30 % (the default until "
            "the check)", 0.0, everywhere=True, shared=None, selection_lr_scale=None,
            select_after=None, selection_gradient="auto"),
    EVERYWHERE_DEFAULT,
    *(replace(EVERYWHERE_DEFAULT, select_after=w / 100,
              name=f"everywhere, shared, α=0, selection lr ×100 → ×3000 after {w} %, picks checked "
                   f"at commit, fresh optimizer state at commit (a longer warm-up)")
      for w in (40, 50)),
    Variant("everywhere, shared, α=0, selection lr ×100 → ×3000 after 30 %, picks checked at "
            "commit, twins share a prior's share", 0.0, everywhere=True, shared=None,
            selection_lr_scale=None, select_after=None, selection_gradient="auto", verify=True,
            prior=TWIN_PRIOR),
    Variant("everywhere, shared, α=0, standardized, selection lr ×100 → ×3000 after 30 %, picks "
            "checked at commit", 0.0, everywhere=True, shared=None, selection_lr_scale=None,
            select_after=None, selection_gradient="standardized", verify=True),
    Variant("everywhere, shared, α=0, hard from the first step, selection lr ×100 → ×3000 after "
            "30 %", 0.0, everywhere=True, shared=None, selection_lr_scale=None, select_after=None,
            selection_gradient="auto", hard=True),
    Variant("everywhere, shared, α=0, selection lr ×100 after 30 % (the default until ×3000)",
            0.0, everywhere=True, shared=None, selection_lr_scale=100.0, select_after=None,
            selection_gradient="auto"),
    Variant("everywhere, α=0, selection lr ×100 after 30 %", 0.0, everywhere=True,
            selection_lr_scale=100.0, select_after=0.3),
    Variant("everywhere, shared, α=0, selection lr ×30 after 30 %", 0.0, everywhere=True,
            shared=True, selection_lr_scale=30.0, select_after=0.3),
    Variant("everywhere, shared, α=0, selection lr ×300 after 50 %", 0.0, everywhere=True,
            shared=True, selection_lr_scale=300.0, select_after=0.5),
    Variant("everywhere, α=0, selection lr ×30", 0.0, everywhere=True, selection_lr_scale=30.0),
    Variant("everywhere, α=0, hard, selection lr ×10", 0.0, everywhere=True, hard=True),
    Variant("everywhere, α=0, selection lr ×30 after 30 %", 0.0, everywhere=True,
            selection_lr_scale=30.0, select_after=0.3),
    Variant("everywhere, shared, α=0, selection lr ×1", 0.0, everywhere=True, shared=True,
            selection_lr_scale=1.0),
    Variant("everywhere, shared, α=0, selection lr ×10", 0.0, everywhere=True, shared=True),
    Variant("everywhere, shared, α=0.3 (mean KL), selection lr ×10", 0.3, everywhere=True,
            shared=True),
    Variant("everywhere, α=0, selection lr 0.1", 0.0, everywhere=True, selection_lr=0.1),
    Variant("everywhere, shared, α=0, selection lr 0.1", 0.0, everywhere=True, shared=True,
            selection_lr=0.1),
    Variant("everywhere, α=0, standardized, selection lr ×10", 0.0, everywhere=True,
            selection_gradient="standardized"),
    Variant("everywhere, shared, α=0, standardized, selection lr ×10", 0.0, everywhere=True,
            shared=True, selection_gradient="standardized"),
    Variant("everywhere, shared, α=0, standardized, selection lr 0.1", 0.0, everywhere=True,
            shared=True, selection_gradient="standardized", selection_lr=0.1),
]
SMOKE_VARIANTS = {HEAD_VARIANTS[0].name, EVERYWHERE_VARIANTS[0].name, *(
    v.name for v in HEAD_VARIANTS + EVERYWHERE_VARIANTS if "(flexact's default)" in v.name)}
"""The paper's and flexact's defaults."""


@dataclass
class Task:
    """A data set and the module that learns it; ``build`` makes one run's module."""

    name: str
    kind: str  # "synthetic" | "teacher" | "digits" | "text"
    make_data: Callable[[bool], L.LightningDataModule]  # argument: smoke sizes
    lr: float
    epochs: int
    depth: int = 0  # hidden layers of the teacher (0: no backbone)
    variants: list[Variant] = field(default_factory=list)

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "synthetic"

    @property
    def has_sites(self) -> bool:
        """The backbone has activation sites: a head-only sweep differs from the full one."""
        return self.kind in ("digits", "text") or self.depth > 1

    def sweep_members(self) -> list[str]:
        """Fixed runs: ``a`` everywhere, and ``head:a`` (ReLU backbone) where it has sites."""
        return CANDIDATES + ([f"{HEAD}{a}" for a in CANDIDATES] if self.has_sites else [])

    def reference(self, variant: Variant) -> str:
        """The sweep a FlexAct run answers: ``head:`` for head-only runs on a backbone."""
        return HEAD if self.has_sites and not variant.everywhere else ""

    @property
    def metric_name(self) -> str:
        return "test MSE" if self.kind == "synthetic" else "test accuracy %"

    def build(self, activation: str | None, variant: Variant | None) -> L.LightningModule:
        """A sweep member (``activation``, ``head:a`` for the head only) or a FlexAct run."""
        head_only = activation is not None and activation.startswith(HEAD)
        if head_only:
            activation = activation.removeprefix(HEAD)  # type: ignore[union-attr]
        candidates = CANDIDATES if activation is None else [activation]
        common: dict[str, Any] = {
            "flexact": {"candidates": candidates, "kl_lambda": KL_LAMBDA,
                        "prior": None if variant is None or variant.prior is None
                        else list(variant.prior),
                        "hard": variant is not None and variant.hard,
                        # a sweep member has one candidate: its gradient is irrelevant
                        "selection_gradient": "raw" if variant is None
                        else variant.selection_gradient},
            "alpha": 0.0 if variant is None else variant.alpha,
            "selection_warmup": 0.0 if variant is None else variant.select_after,
            "selection_lr_scale": 1.0 if variant is None else (
                variant.selection_lr_scale if variant.selection_lr is None
                else variant.selection_lr / self.lr),
            "selection_lr_scale_end": None if variant is None else variant.selection_lr_scale_end,
            "optimizer": lambda params: torch.optim.Adam(params, lr=self.lr),
        }
        if self.kind == "synthetic":
            module: L.LightningModule = FlexActRegressor(in_features=4, hidden_features=None,
                                                         **common)
            return _fix(module, activation)
        everywhere = variant is not None and variant.everywhere
        common.update(swap_backbone=everywhere,
                      share_selection=False if variant is None else variant.shared,
                      kl_reduction="mean" if variant is None else variant.kl_reduction,
                      regularize_backbone=variant is None or variant.regularize_backbone)
        # head-only FlexAct and the head sweep: the backbone keeps its ReLU
        act = "relu" if activation is None or head_only else activation
        if self.kind == "teacher":
            backbone: torch.nn.Module = MLP(10, hidden=[10] * (self.depth - 1), activation=act)
            head = {"num_classes": 2, "hidden_features": 10}
        elif self.kind == "digits":
            backbone = LeNet5(1, 28, channels=(6, 16), hidden_features=None, activation=act)
            head = {"num_classes": 10, "hidden_features": 84}
        else:
            backbone = TextCNN(embedding_dim=32, filter_sizes=(3, 5), num_filters=16,
                               activation=act, dropout=0.0)
            head = {"num_classes": 2, "hidden_features": 16}
        return _fix(FlexActClassifier(backbone=backbone, **head, **common), activation)


def _fix(module: L.LightningModule, activation: str | None) -> L.LightningModule:
    """A sweep member's one-candidate FlexAct layers computing exactly ``activation``."""
    if activation is not None:
        for _, layer in named_layers(module):
            layer.commit(True)  # one candidate: exactly the activation, from step 0
    return module


def make_tasks() -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    for truth in CANDIDATES:
        def synthetic(smoke: bool, truth: str = truth) -> L.LightningDataModule:
            return SyntheticDataModule(truth=truth, n_train=256 if smoke else 2048, n_val=64,
                                       n_test=256 if smoke else 1024, seed=0, batch_size=64)
        tasks[f"synthetic-{truth}"] = Task(f"synthetic-{truth}", "synthetic", synthetic,
                                           lr=0.05, epochs=15, variants=HEAD_VARIANTS)
    for depth, teacher in [(1, "sigmoid"), (1, "relu"), (8, "sigmoid"), (8, "relu")]:
        def teacher_data(smoke: bool, depth: int = depth,
                         teacher: str = teacher) -> L.LightningDataModule:
            # The teacher's seed is benchmarks/teacher.py's, so both benchmarks see one teacher.
            return TeacherDataModule(depth=depth, activation=teacher,
                                     n_samples=400 if smoke else 6000,
                                     seed=depth * 10 + len(teacher), batch_size=128)
        variants = HEAD_VARIANTS + (EVERYWHERE_VARIANTS if depth > 1 else [])
        name = f"teacher-d{depth}-{teacher}"
        tasks[name] = Task(name, "teacher", teacher_data, lr=0.01, epochs=20, depth=depth,
                           variants=variants)
    tasks["digits-lenet5"] = Task("digits-lenet5", "digits", _digits, lr=3e-3, epochs=12,
                                  variants=HEAD_VARIANTS + EVERYWHERE_VARIANTS)
    tasks["text-cnn"] = Task("text-cnn", "text", _reviews, lr=3e-3, epochs=8,
                             variants=HEAD_VARIANTS + EVERYWHERE_VARIANTS)
    return tasks


_ROOT: list[tempfile.TemporaryDirectory[str]] = []  # the on-disk data, written once a process


def _data_dir() -> str:
    if not _ROOT:
        _ROOT.append(tempfile.TemporaryDirectory(prefix="flexact-sweep-"))
        root = _ROOT[0].name
        write_digits_mnist(root)
        # Three sentiment words per review, each of the review's polarity with probability 0.7:
        # the label shows in the majority only, so the task is not solved by one word.
        write_review_polarity(root, n_per_class=1000, length=30, cue_purity=0.7)
    return _ROOT[0].name


def _digits(smoke: bool) -> L.LightningDataModule:
    """scikit-learn's digits as MNIST idx files (1 500 train / 297 test), read by torchvision."""
    return MNISTDataModule(data_dir=_data_dir(), val_split=0.0, batch_size=64, augment=False,
                           on_device=False)


def _reviews(smoke: bool) -> L.LightningDataModule:
    """Review-polarity v2.0 folders (``txt_sentoken/{neg,pos}``), 2 000 reviews, 20 % test."""
    return TextDataModule(data_dir=_data_dir(), source="review_polarity", val_split=0.0,
                          test_split=0.2, batch_size=50)


TASKS = make_tasks()
GROUPS = {"synthetic": [t for t in TASKS if t.startswith("synthetic")],
          "teacher": [t for t in TASKS if t.startswith("teacher")],
          "image": ["digits-lenet5"], "text": ["text-cnn"]}


def evaluate(task: Task, module: L.LightningModule, data: L.LightningDataModule) -> float:
    data.setup("test")
    module.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in data.test_dataloader():
            x, y = data.on_after_batch_transfer(batch, 0)  # images: uint8 → normalized floats
            out = module(x)
            if task.kind == "synthetic":
                total += float((out - y.reshape(out.shape)).square().sum())
            else:
                total += 100.0 * float((out.argmax(-1) == y).sum())
            n += len(y)
    return total / n


class ClearStateAt(L.Callback):
    """Clear the optimizers' state once, before the step at ``fraction`` of the run.

    The control for ``SelectionCommit(reset_optimizer=True)``: a sweep member given the same
    warm restart, with no selection and no commit (``--clear-member-state``).
    """

    def __init__(self, fraction: float) -> None:
        self.fraction, self.step = fraction, -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = int(self.fraction * trainer.estimated_stepping_batches)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            clear_state(trainer.optimizers, keep=())  # what reset_optimizer does at a commit


def fit_one(task: Task, seed: int, epochs: int, smoke: bool, activation: str | None = None,
            variant: Variant | None = None, clear_at: float | None = None) -> dict[str, Any]:
    """Train one run; time its ``trainer.fit`` alone (``clear_at``: :class:`ClearStateAt` for
    a sweep member)."""
    L.seed_everything(seed, verbose=False)  # initialization and Gumbel noise; data is fixed
    data = task.make_data(smoke)
    module = task.build(activation, variant)
    callbacks: list[L.Callback] = [TemperatureAnnealing(start=1.0, end=0.2)]
    if activation is not None and clear_at is not None:
        callbacks.append(ClearStateAt(clear_at))
    commit = None
    if variant is not None:
        commit = SelectionCommit(**COMMIT, verify=variant.verify, reset_optimizer=variant.reset)
        callbacks.append(commit)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"task": task.name, "seed": seed, "activation": activation,
                           "variant": None if variant is None else variant.name,
                           "seconds": seconds, "steps": trainer.global_step,
                           "metric": evaluate(task, module, data)}
    if variant is not None:
        assert commit is not None
        total = max(trainer.global_step, 1)
        layers = []
        for name, layer in named_layers(module):
            probs = layer.probabilities().reshape(-1)
            layers.append({"name": name, "head": name.startswith("head"),
                           "pick": layer.selected()[0], "top": float(probs.max()),
                           "committed_at": commit.committed_steps.get(name, total) / total})
        row["layers"] = layers
    return row


def interleaved(task: Task, seed: int) -> list[tuple[str | None, Variant | None]]:
    """FlexAct runs spread among the sweep members; the order rotates with the seed."""
    sweep: list[tuple[str | None, Variant | None]] = [(a, None) for a in task.sweep_members()]
    flex: list[tuple[str | None, Variant | None]] = [(None, v) for v in task.variants]
    sweep = sweep[seed % len(sweep):] + sweep[:seed % len(sweep)]
    if not flex:  # --variants matched none of this task's: the sweep alone
        return sweep
    flex = flex[seed % len(flex):] + flex[:seed % len(flex)]
    order: list[tuple[str | None, Variant | None]] = []
    n_flex, total = len(flex), len(sweep) + len(flex)
    for i in range(total):  # a FlexAct run whenever FlexAct is behind its even share
        placed = n_flex - len(flex)
        if flex and (not sweep or (placed + 0.5) / n_flex <= (i + 0.5) / total):
            order.append(flex.pop(0))
        else:
            order.append(sweep.pop(0))
    return order


def thread_check(repeats: int = 5, steps: int = 100) -> str:
    """Step time of the synthetic model with 1 and 2 torch threads, fixed ReLU vs FlexAct heads.

    A bare training step (forward, MSE + α·KL, backward, Adam), no Lightning; interleaved
    repeats, medians. Shows why the runs above use one thread on this shared machine.
    """
    task = TASKS["synthetic-relu"]
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    models = {"fixed ReLU": ("relu", None), "FlexAct head, α=0": (None, HEAD_VARIANTS[1]),
              "FlexAct head, α=0.3": (None, HEAD_VARIANTS[0])}
    times: dict[tuple[int, str], list[float]] = {}
    threads = torch.get_num_threads()
    try:
        for _ in range(repeats):
            for n in (1, 2):
                torch.set_num_threads(n)
                for label, (activation, variant) in models.items():
                    torch.manual_seed(0)
                    module = task.build(activation, variant)
                    module.train()
                    optimizer = torch.optim.Adam(module.parameters(), lr=task.lr)
                    for i in range(steps + 10):  # 10 warm-up steps
                        if i == 10:
                            start = time.perf_counter()
                        loss = module.criterion(module(x), y)
                        extra = module.regularizer()
                        loss = loss if extra is None else loss + extra
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                    times.setdefault((n, label), []).append(
                        (time.perf_counter() - start) / steps * 1e3)
    finally:
        torch.set_num_threads(threads)
    lines = ["| threads | " + " | ".join(f"{m} ms/step" for m in models) + " |",
             "|---" * (len(models) + 1) + "|"]
    for n in (1, 2):
        lines.append(f"| {n} | " + " | ".join(f"{statistics.median(times[n, m]):.2f}"
                                             for m in models) + " |")
    return "\n".join(lines)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _metric_within(metric: float, best: tuple[float, float], sign: float) -> bool:
    """Whether ``metric`` beats the best's mean or trails it by at most its seed noise."""
    mean, std = best
    return sign * (metric - mean) >= -NOISE_FACTOR * std


def _fmt(task: Task, value: float, signed: bool = False) -> str:
    digits = 4 if task.kind == "synthetic" else 1
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _majority(layers: list[dict[str, Any]]) -> str:
    """The run's pick: the most common pick over its FlexAct layers (ties: the head's)."""
    counts = Counter(layer["pick"] for layer in layers)
    top = max(counts.values())
    head = next(layer["pick"] for layer in layers if layer["head"])
    return head if counts[head] == top else next(p for p, c in counts.items() if c == top)


def summarize(runs: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The sweep table, the FlexAct-vs-sweep table, and one row per (task, FlexAct variant)."""
    task_names = list(dict.fromkeys(r["task"] for r in runs))
    sweep_lines = ["| task | metric | " + " | ".join(CANDIDATES) + " | best | best per seed |",
                   "|---" * (len(CANDIDATES) + 4) + "|"]
    cells: list[dict[str, Any]] = []
    for name in task_names:
        task = TASKS[name]
        sign = 1.0 if task.higher_is_better else -1.0
        seeds = sorted({r["seed"] for r in runs if r["task"] == name})
        sweeps: dict[str, dict[str, Any]] = {}  # scope ("" everywhere, "head:") → its sweep
        for scope in ([""] + ([HEAD] if task.has_sites else [])):
            members = [r for r in runs if r["task"] == name and r["activation"] is not None
                       and r["activation"].startswith(HEAD) == bool(scope)]
            stats = {a: _mean_std([r["metric"] for r in members if r["activation"] == scope + a])
                     for a in CANDIDATES}
            best = max(CANDIDATES, key=lambda a: sign * stats[a][0])
            per_seed = [max((r for r in members if r["seed"] == seed),
                            key=lambda r: sign * r["metric"])["activation"].removeprefix(scope)
                        for seed in seeds]
            label = name + (HEAD_LABEL if scope else "")
            sweep_lines.append(
                f"| {label} | {task.metric_name} | "
                + " | ".join(("**{}**" if a == best else "{}").format(
                    f"{_fmt(task, m)} ± {_fmt(task, s)}") for a, (m, s) in stats.items())
                + f" | {best} | {', '.join(per_seed)} |")
            sweeps[scope] = {
                "stats": stats, "best": best,
                "seconds": {seed: sum(r["seconds"] for r in members if r["seed"] == seed)
                            for seed in seeds},
                "steps": {seed: sum(r["steps"] for r in members if r["seed"] == seed)
                          for seed in seeds}}
        for variant in task.variants:
            flex = sorted((r for r in runs if r["task"] == name and r["variant"] == variant.name),
                          key=lambda r: r["seed"])
            if not flex:
                continue
            ref = sweeps[task.reference(variant)]
            stats, best = ref["stats"], ref["best"]
            best_mean, best_std = stats[best]
            sweep_seconds, sweep_steps = ref["seconds"], ref["steps"]
            picks = [_majority(r["layers"]) for r in flex]
            head_picks = [next(x["pick"] for x in r["layers"] if x["head"]) for r in flex]
            hidden = Counter(x["pick"] for r in flex for x in r["layers"] if not x["head"])
            layers = [x for r in flex for x in r["layers"]]
            metric_mean, metric_std = _mean_std([r["metric"] for r in flex])
            flex_seconds = sum(r["seconds"] for r in flex)
            flex_steps = sum(r["steps"] for r in flex)
            wall = flex_seconds / sum(sweep_seconds[r["seed"]] for r in flex)
            steps = flex_steps / sum(sweep_steps[r["seed"]] for r in flex)
            cells.append({
                "task": name + (HEAD_LABEL if task.reference(variant) else ""),
                "flexact": variant.name, "picks": picks, "head_picks": head_picks,
                "hidden": {p: c / sum(hidden.values()) for p, c in hidden.most_common()},
                "decisive": sum(x["top"] >= DECISIVE for x in layers) / len(layers),
                "top": statistics.fmean(x["top"] for x in layers),
                "committed_at": statistics.fmean(x["committed_at"] for x in layers),
                "best": best, "best_std": best_std,
                "equal": sum(p == best for p in picks),
                "within": sum(abs(stats[p][0] - best_mean) <= NOISE_FACTOR * best_std
                              for p in picks),
                "seeds": len(flex), "metric": metric_mean, "metric_std": metric_std,
                "delta": metric_mean - best_mean, "wall_ratio": wall, "step_ratio": steps,
                # FlexAct's own metric, its mean and per run (one seed's miss costs one run)
                "metric_within": _metric_within(metric_mean, stats[best], sign),
                "metric_runs": sum(_metric_within(r["metric"], stats[best], sign) for r in flex),
                "per_step_ratio": wall / steps, "flex_seconds": flex_seconds,
                "sweep_seconds": sum(sweep_seconds[r["seed"]] for r in flex),
            })
    header = ["task", "FlexAct", "pick per seed (head; hidden layers)", "decisive",
              "top p", "commit at", "= best", "within noise", "FlexAct metric",
              "Δ vs best", "wall FlexAct / sweep", "steps FlexAct / sweep", "s/step ratio"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for cell in cells:
        task = TASKS[cell["task"].removesuffix(HEAD_LABEL)]
        pick = ", ".join(cell["head_picks"])
        if cell["hidden"]:
            pick += "; hidden: " + ", ".join(f"{p} {100 * f:.0f} %"
                                             for p, f in cell["hidden"].items())
            pick += " → " + ", ".join(cell["picks"])
        lines.append(
            f"| {cell['task']} | {cell['flexact']} | {pick} | {100 * cell['decisive']:.0f} % | "
            f"{cell['top']:.2f} | {cell['committed_at']:.2f} | {cell['equal']}/{cell['seeds']} | "
            f"{cell['within']}/{cell['seeds']} | {_fmt(task, cell['metric'])} ± "
            f"{_fmt(task, cell['metric_std'])} | {_fmt(task, cell['delta'], signed=True)} | "
            f"**{cell['wall_ratio']:.3f}** | {cell['step_ratio']:.3f} | "
            f"{cell['per_step_ratio']:.2f} |")
    text = ("Sweep: " + "; ".join(sorted({TASKS[n].metric_name for n in task_names}))
            + ", mean ± std over seeds per fixed activation (bold: the best mean).\n\n"
            + "\n".join(sweep_lines) + "\n\nFlexAct against the sweep:\n\n" + "\n".join(lines)
            + "\n\n" + _summary(cells))
    return text, cells


def _summary(cells: list[dict[str, Any]]) -> str:
    lines = ["Totals per FlexAct variant (runs over all tasks and seeds):", ""]
    for variant in dict.fromkeys(c["flexact"] for c in cells):
        group = [c for c in cells if c["flexact"] == variant]
        runs = sum(c["seeds"] for c in group)
        walls = [c["wall_ratio"] for c in group]
        flex_s, sweep_s = (sum(c[k] for c in group) for k in ("flex_seconds", "sweep_seconds"))
        lines.append(
            f"- {variant}: pick = sweep's best in {sum(c['equal'] for c in group)}/{runs}, within "
            f"its seed noise in {sum(c['within'] for c in group)}/{runs}; metric within the "
            f"best's seed noise in {sum(c['metric_within'] for c in group)}/{len(group)} tasks "
            f"(runs: {sum(c['metric_runs'] for c in group)}/{runs}); "
            f"decisive layers "
            f"{100 * statistics.fmean(c['decisive'] for c in group):.0f} %; wall time FlexAct / "
            f"sweep {flex_s / sweep_s:.3f} overall ({min(walls):.3f}–{max(walls):.3f} per task).")
    return "\n".join(lines)


NOTES = """\
Columns: *pick per seed*: the head's pick in each seed's run; for FlexAct everywhere also the
share of hidden-layer picks over seeds and, after →, each run's pick (most common over all its
FlexAct layers, ties to the head's), which is what *= best* and *within noise* judge. *decisive*:
share of FlexAct layers whose top selection probability at the end is ≥ 0.9; *top p*: its mean
(probabilities freeze at a layer's commit). *commit at*: mean fraction of the run at which the
layers committed (0.70 = the latest, `at`; less: settled early, adaptive commit). *= best*: seeds
whose pick is the sweep's best activation. *within noise*: seeds whose pick's sweep mean lies
within 2 × the best's seed std of the best's mean (|mean(pick) − mean(best)| ≤ 2·std(best)).
*Δ vs best*: FlexAct's mean metric minus the best sweep member's (accuracy: > 0 is better; MSE:
< 0 is better); the totals' *metric within noise* counts tasks where it is better than the best's
mean or worse by at most 2 × the best's seed std (runs: the same test for each run's metric).
*wall FlexAct / sweep*: summed `trainer.fit` seconds of the FlexAct runs over
those of all five sweep runs of the same seeds (runs interleaved); *steps*: optimizer steps, the
same ratio (1/5 at equal epochs); *s/step ratio*: their quotient, FlexAct's time per step over a
fixed-activation run's. The sweep's best is the activation with the best mean test metric over
seeds. Tasks with a backbone (teacher depth 8, digits, text) have two sweeps: the activation
everywhere, which FlexAct everywhere answers, and the activation in the head only with the
backbone's ReLU kept (rows "(head only)"), which head-only FlexAct answers: the same network and
question, so its picks and its time are compared with that sweep. One torch thread: with two on this
shared 2-core machine, the batched matmul of the regularizer's gradient norms (α > 0 heads,
measured through the head's input weight, flexact/nn/norms.py) opens an OpenMP parallel region
that waits milliseconds for a descheduled thread, and an α = 0.3 run then costs several times a
fixed run per step (threads check at the end); for models this small one thread is also the
faster setting for every run."""


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per run")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the first seed (a replicate on new seeds: --first-seed 6)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every run (default: 15 synthetic, 20 teacher)")
    parser.add_argument("--tasks", nargs="+", default=["synthetic", "teacher", "image", "text"],
                        choices=[*GROUPS, *TASKS], help="task names or groups")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--variants", nargs="+", default=None, metavar="TEXT",
                        help="run only the FlexAct variants whose name contains one of these")
    parser.add_argument("--smoke", action="store_true",
                        help="1 seed, 1 epoch, tiny data, two tasks: a seconds-long check")
    parser.add_argument("--clear-member-state", type=float, default=None, metavar="FRACTION",
                        help="clear each sweep member's optimizer state once, at this fraction "
                             "of its run (the control for reset_optimizer)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: see the notes on this shared machine)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    torch.set_num_threads(args.threads)
    logger.setLevel(logging.ERROR)  # hundreds of Trainers: no start-up banners
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            return _run(args)
    finally:
        torch.set_num_threads(threads)
        logger.setLevel(level)


def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    names = list(dict.fromkeys(t for g in args.tasks for t in GROUPS.get(g, [g])))
    seeds, epochs = args.seeds, args.epochs
    if args.smoke:
        names, seeds, epochs = ["synthetic-tanh", "teacher-d8-relu", "digits-lenet5",
                                "text-cnn"], 1, 1
        for name in names:
            TASKS[name].variants = [v for v in TASKS[name].variants if v.name in SMOKE_VARIANTS]
    start = time.perf_counter()
    if not args.smoke:  # the first fit of a process pays one-off costs: keep them out
        fit_one(TASKS["synthetic-relu"], 0, 1, True, variant=HEAD_VARIANTS[0])
    runs: list[dict[str, Any]] = []
    for name in names:
        task = TASKS[name]
        if args.variants:
            task.variants = [v for v in task.variants if any(t in v.name for t in args.variants)]
        t0 = time.perf_counter()
        for seed in range(args.first_seed, args.first_seed + seeds):
            for activation, variant in interleaved(task, seed):
                runs.append(fit_one(task, seed, epochs or task.epochs, args.smoke, activation,
                                    variant, args.clear_member_state))
        runs_per_seed = len(task.variants) + len(task.sweep_members())
        print(f"[{name}] {runs_per_seed} runs × {seeds} seeds ({args.first_seed}–"
              f"{args.first_seed + seeds - 1}) in {time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    text, cells = summarize(runs)
    if not args.smoke:
        text += ("\n\nThreads check (`thread_check`: a bare training step of the synthetic "
                 "model, batch 64, medians of 5 interleaved repeats of 100 steps):\n\n"
                 + thread_check())
        seconds = time.perf_counter() - start
    print(text)
    print(f"total {seconds:.0f} s")
    if not args.no_write:
        kinds = {TASKS[r["task"]].kind: r for r in runs}
        epochs_text = ", ".join(
            f"{k}: {epochs or TASKS[r['task']].epochs} epochs, {r['steps']} steps"
            for k, r in kinds.items())
        write_section(
            "sweep", "One FlexAct run vs a sweep of the five fixed activations", seconds,
            f"{seeds} seeds (from {args.first_seed}); every run (FlexAct or sweep member) of a "
            "task has the same "
            f"length ({epochs_text}); data: synthetic 2 048 training / 1 024 test samples, "
            "teacher 6 000 examples (4 200 train / 1 200 test), digits 1 500 / 297, reviews "
            f"1 600 / 400; {args.threads} torch thread(s); "
            "SelectionCommit adaptive "
            "(threshold 0.9, patience 3, checks every 20 steps from 20 % of the run, pruning "
            "below 0.02, all committed at 70 %). " + NOTES + "\n\n" + text,
        )
    return cells


if __name__ == "__main__":
    main()
