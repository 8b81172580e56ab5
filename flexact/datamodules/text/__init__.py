"""Text classification data: :class:`TextDataModule` and the pieces it is built from.

One concept per module:

- :mod:`~flexact.datamodules.text.tokens`: :func:`tokenize` by a regular expression;
- :mod:`~flexact.datamodules.text.vocabulary`: :class:`Vocabulary` (``<pad>`` = 0,
  ``<unk>`` = 1) and :class:`VocabularyConsumer`, what a backbone offers to receive it;
- :mod:`~flexact.datamodules.text.vectors`: :func:`load_vectors`, word2vec/GloVe text files;
- :mod:`~flexact.datamodules.text.readers`: the file layouts (lines, folders, CSV/TSV, JSON
  lines) and :class:`TextDecoder`, which counts undecodable bytes;
- :mod:`~flexact.datamodules.text.sources`: where each ``source`` lives, and :class:`Corpus`;
- :mod:`~flexact.datamodules.text.folds`: stratified k-fold or fixed splits;
- :mod:`~flexact.datamodules.text.datasets`: a corpus split and encoded into tensors;
- :mod:`~flexact.datamodules.text.module`: :class:`TextDataModule` itself.

Every name is importable from here, e.g. ``flexact.datamodules.text.TextDataModule`` (the class
path that configs and checkpoints name).
"""

from flexact.datamodules.text.folds import check_split_options, stratified_splits
from flexact.datamodules.text.module import TextDataModule
from flexact.datamodules.text.readers import Record, TextDecoder
from flexact.datamodules.text.sources import (
    POLARITY_LABELS,
    POLARITY_URLS,
    SOURCES,
    Corpus,
    Source,
    label_order,
    polarity_files,
)
from flexact.datamodules.text.tokens import DEFAULT_TOKEN_PATTERN, tokenize
from flexact.datamodules.text.vectors import load_vectors
from flexact.datamodules.text.vocabulary import PAD, UNK, Vocabulary, VocabularyConsumer

__all__ = [
    "DEFAULT_TOKEN_PATTERN",
    "PAD",
    "POLARITY_LABELS",
    "POLARITY_URLS",
    "SOURCES",
    "UNK",
    "Corpus",
    "Record",
    "Source",
    "TextDataModule",
    "TextDecoder",
    "Vocabulary",
    "VocabularyConsumer",
    "check_split_options",
    "label_order",
    "load_vectors",
    "polarity_files",
    "stratified_splits",
    "tokenize",
]
