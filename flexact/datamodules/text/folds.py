"""Stratified, seeded train/val/test splits: k-fold cross-validation or fixed fractions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flexact.errors import ConfigError

__all__ = ["check_split_options", "stratified_splits"]


def check_split_options(num_folds: int | None, fold: int, val_split: float, test_split: float,
                        separate_test: bool) -> None:
    """Check the split arguments of :class:`~flexact.datamodules.TextDataModule`.

    Args:
        num_folds: Number of cross-validation folds, or ``None`` for fixed splits.
        fold: Which fold is the test set.
        val_split: Fraction of the non-test texts held out for validation.
        test_split: Fraction of the texts held out for testing (fixed splits only).
        separate_test: Whether the test set is a separate file or folder.

    Raises:
        ConfigError: If the arguments contradict each other or lie outside their range.
    """
    if num_folds is not None:
        if num_folds < 2:
            raise ConfigError(f"num_folds must be >= 2 (or null for fixed splits), "
                              f"got {num_folds}")
        if not 0 <= fold < num_folds:
            raise ConfigError(f"fold must lie in [0, {num_folds}), got {fold}")
        if separate_test:
            raise ConfigError("give either num_folds (cross-validation) or test_path "
                              "(a fixed test set), not both")
    if not 0 <= val_split < 1:
        raise ConfigError(f"val_split must be a fraction in [0, 1), got {val_split}")
    if num_folds is None and not separate_test and not 0 < test_split < 1:
        raise ConfigError(f"test_split must be a fraction in (0, 1), got {test_split}")


def _fraction(n: int, fraction: float) -> int:
    """``round(n · fraction)``, at least 1 when the fraction is positive and ``n`` ≥ 2."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, math.floor(n * fraction + 0.5)))


def stratified_splits(labels: Sequence[int], seed: int, num_folds: int | None = None,
                      fold: int = 0, val_split: float = 0.1, test_split: float = 0.1,
                      separate_test: bool = False) -> dict[str, list[int]]:
    """Indices of the ``train``, ``val`` and ``test`` texts, drawn per label with ``seed``.

    The texts of each label are shuffled once with ``seed``. With ``num_folds``, every
    ``num_folds``-th of them (from ``fold`` on) is a test text, so the folds partition the
    corpus identically for every ``fold``; with ``separate_test`` no text is a test text;
    otherwise the first ``test_split`` of them are. Then ``val_split`` of the rest are
    validation texts.

    Args:
        labels: The class index of each text.
        seed: Seed of the shuffling.
        num_folds: Number of cross-validation folds, or ``None`` for fixed splits.
        fold: Which fold is the test set.
        val_split: Fraction of the non-test texts held out for validation.
        test_split: Fraction of the texts held out for testing (fixed splits only).
        separate_test: The test set is elsewhere: keep every text for training and validation.

    Returns:
        The sorted indices of each split.
    """
    generator = torch.Generator().manual_seed(seed)
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    split: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in sorted(by_label):
        members = by_label[label]
        members = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
        if num_folds is not None:
            test = members[fold::num_folds]
            rest = [m for k, m in enumerate(members) if k % num_folds != fold]
        elif separate_test:
            test, rest = [], members
        else:
            n_test = _fraction(len(members), test_split)
            test, rest = members[:n_test], members[n_test:]
        n_val = _fraction(len(rest), val_split)
        split["test"] += test
        split["val"] += rest[:n_val]
        split["train"] += rest[n_val:]
    return {name: sorted(indices) for name, indices in split.items()}
