"""From a :class:`Corpus` to the data set of each split: texts, class indices, token ids.

:class:`~flexact.datamodules.TextDataModule` builds its splits in two steps: :func:`split_corpus`
reads the corpus (and any separate test set), maps the label names to class indices and draws
the stratified splits of :mod:`~flexact.datamodules.text.folds`; :func:`encode_splits` then
tokenizes the texts, builds the vocabulary on the training split only and pads the token ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import TensorDataset

from flexact.datamodules._common import DatasetError
from flexact.datamodules.text.folds import stratified_splits
from flexact.datamodules.text.readers import Record
from flexact.datamodules.text.sources import Corpus
from flexact.datamodules.text.tokens import tokenize
from flexact.datamodules.text.vocabulary import Vocabulary

__all__ = ["SplitTexts", "encode_splits", "split_corpus"]


@dataclass(frozen=True)
class SplitTexts:
    """The texts of each split (``train``, ``val``, ``test``) and their class indices.

    Attributes:
        texts: The texts of each split.
        targets: The class index of each text, in the same order.
        indices: Where each split's texts are in the corpus (the test split's in the separate
            test set, if there is one).
    """

    texts: dict[str, list[str]]
    targets: dict[str, list[int]]
    indices: dict[str, list[int]]


def _class_indices(corpus: Corpus, records: list[Record], index: dict[str, int],
                   which: Literal["main", "test"]) -> list[int]:
    unknown = next((label for _, label in records if label not in index), None)
    if unknown is not None:
        raise DatasetError(f"{corpus.location(which)}: label {unknown!r} is not among "
                           f"data.labels {list(index)}")
    return [index[label] for _, label in records]


def split_corpus(corpus: Corpus, label_names: Sequence[str], seed: int, num_folds: int | None,
                 fold: int, val_split: float, test_split: float) -> SplitTexts:
    """Read the corpus and draw its stratified splits (see :func:`stratified_splits`).

    With a separate test set (the corpus's ``test_path``), that set is the test split and the
    main corpus is split into training and validation texts only.

    Args:
        corpus: The texts on disk.
        label_names: The label names in class-index order.
        seed: Seed of the splits.
        num_folds: Number of cross-validation folds, or ``None`` for fixed splits.
        fold: Which fold is the test set.
        val_split: Fraction of the non-test texts held out for validation.
        test_split: Fraction of the texts held out for testing (fixed splits only).

    Returns:
        The texts, class indices and corpus indices of each split.

    Raises:
        DatasetError: If a label is not among ``label_names``, or the training or test split
            is empty.
    """
    index = {name: i for i, name in enumerate(label_names)}
    separate_test = corpus.paths["test"] is not None
    main = corpus.read("main")
    main_labels = _class_indices(corpus, main, index, "main")
    splits = stratified_splits(main_labels, seed, num_folds, fold, val_split, test_split,
                               separate_test=separate_test)
    indices = dict(splits)
    texts = {name: [main[i][0] for i in ids] for name, ids in splits.items()}
    targets = {name: [main_labels[i] for i in ids] for name, ids in splits.items()}
    if separate_test:
        test = corpus.read("test")
        texts["test"] = [t for t, _ in test]
        indices["test"] = list(range(len(test)))
        targets["test"] = _class_indices(corpus, test, index, "test")
    if not texts["train"] or not texts["test"]:
        raise DatasetError(f"{corpus.location('main')}: {len(main)} texts are too few "
                           "for the requested splits; add data or change the split fractions")
    return SplitTexts(texts, targets, indices)


def encode_splits(parts: SplitTexts, pattern: re.Pattern[str], lowercase: bool, min_freq: int,
                  max_vocab_size: int | None, max_length: int | None,
                  ) -> tuple[Vocabulary, dict[str, TensorDataset], int]:
    """Tokenize every split, build the vocabulary on the training split, encode and pad.

    Args:
        parts: The texts and class indices of each split.
        pattern: Regular expression whose matches are the tokens.
        lowercase: Lower-case texts before tokenizing.
        min_freq: Training-split tokens seen fewer times become ``<unk>``.
        max_vocab_size: Keep at most this many of the most frequent tokens.
        max_length: Tokens kept per text; ``None``: the longest training text.

    Returns:
        The vocabulary, the ``(token ids (N, L), labels (N,))`` data set of each non-empty
        split, and the padded length ``L``.
    """
    tokens = {name: [tokenize(t, pattern, lowercase) for t in ts]
              for name, ts in parts.texts.items()}
    vocab = Vocabulary.build(tokens["train"], min_freq, max_vocab_size)
    length = max_length or max(1, max(len(t) for t in tokens["train"]))
    datasets = {name: TensorDataset(vocab.encode_padded(tokens[name], length),
                                    torch.tensor(parts.targets[name]))
                for name in ("train", "val", "test") if tokens[name]}
    return vocab, datasets, length
