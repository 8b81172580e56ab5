"""``TextDataModule``: sentence / document polarity classification (docs/method.md §4, TextCNN).

Reads the movie-review polarity data (sentence polarity v1.0 and review polarity v2.0 of Pang &
Lee) or any corpus of yours (:mod:`~flexact.datamodules.text.sources`), splits it
(:mod:`~flexact.datamodules.text.folds`), tokenizes it with a regular expression, builds the
vocabulary on the training split only (:mod:`~flexact.datamodules.text.vocabulary`) and serves
padded token-id tensors (:mod:`~flexact.datamodules.text.datasets` does the last three).

How the model learns the vocabulary: its size is known only once the data are read, in
``setup``, after the CLI has built the model. The data module then exposes it as
:attr:`TextDataModule.vocab_size`, with any pretrained vectors as :attr:`TextDataModule.vectors`,
and :meth:`TextDataModule.setup` is the one place that hands both to the model: if the attached
LightningModule's ``backbone`` is a :class:`VocabularyConsumer` (has
``set_vocabulary(vocab_size, vectors)``, as :class:`~flexact.backbones.TextCNN` has), it calls
that method once. Nothing else in the model is looked at. Lightning runs the data module's
``setup`` before it creates the optimizer, so the embedding is trained like any other
parameter. Outside Lightning, pass ``vocab_size`` to the backbone or call ``set_vocabulary``
yourself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import TensorDataset

from flexact.datamodules._common import DatasetError, fetch_archive
from flexact.datamodules.base import SplitDataModule
from flexact.datamodules.text.datasets import encode_splits, split_corpus
from flexact.datamodules.text.folds import check_split_options
from flexact.datamodules.text.readers import Record, TextDecoder
from flexact.datamodules.text.sources import (
    POLARITY_URLS,
    Corpus,
    Source,
    check_source_options,
    polarity_files,
)
from flexact.datamodules.text.tokens import DEFAULT_TOKEN_PATTERN, compile_token_pattern
from flexact.datamodules.text.vectors import load_vectors
from flexact.datamodules.text.vocabulary import Vocabulary, VocabularyConsumer
from flexact.errors import ConfigError

__all__ = ["TextDataModule"]


class TextDataModule(SplitDataModule):
    """Text classification: polarity data or your corpus, as padded token-id tensors.

    Sources (``source``):

    - ``review_polarity``: review polarity v2.0, 2 000 movie reviews in
      ``<data_dir>/txt_sentoken/{neg,pos}/*.txt`` (the Farhadi et al. / docs/method.md §4 set).
    - ``sentence_polarity``: sentence polarity v1.0 ("MR", Kim 2014), 10 662 sentences in
      ``<data_dir>/rt-polaritydata/rt-polarity.{neg,pos}``, one per line.
    - ``folder``: one sub-folder per label, one text per file, under ``path``.
    - ``csv`` / ``tsv`` / ``jsonl``: one record per row/line with the fields ``text_field`` and
      ``label_field`` (CSV/TSV need a header row).

    Splits: k-fold cross-validation (``num_folds`` and ``fold``: that fold is the test set), a
    separate ``test_path``, or a fixed ``test_split`` fraction; the validation split is then
    carved from the rest with ``val_split``. All splits are stratified by label and drawn with
    ``seed``, so every fold of a cross-validation sees the same partition. Batches are
    ``(token ids (B, L) int64, labels (B,))`` with ``<pad>`` = 0.

    Bytes that do not decode with ``encoding`` are replaced and counted (a warning says how many),
    never fatal. The training order of epoch ``e`` is a pure function of the run's seed and
    ``e``, and the training loader resumes mid-epoch (see
    :class:`~flexact.datamodules.base.SplitDataModule`).

    After :meth:`setup`, :attr:`vocab_size` and :attr:`vectors` describe the vocabulary, and
    :meth:`setup` has handed them to the model's backbone (see the module's docstring).

    Args:
        data_dir: Folder of the data (polarity data, and the base of relative ``path``s).
        source: Which data set or file format to read.
        path: For ``folder``/``csv``/``tsv``/``jsonl``: the folder or file, relative to
            ``data_dir`` or absolute (default: ``data_dir`` itself for ``folder``).
        test_path: Optional separate test folder or file in the same format as ``path``; then
            ``num_folds`` and ``test_split`` are not used.
        text_field: Field (column) holding the text, for csv/tsv/jsonl.
        label_field: Field (column) holding the label, for csv/tsv/jsonl.
        labels: The label names in class-index order; default: ``neg, pos`` for the polarity
            data, else the sorted distinct labels found (numerically if all are integers).
        download: Fetch and extract the official archive when the polarity data are missing
            (only for the two polarity sources).
        url: Address of the archive to download; default: the official one of ``source``.
        encoding: Text encoding of the files (undecodable bytes are replaced and counted).
        lowercase: Lower-case texts before tokenizing.
        token_pattern: Regular expression whose matches are the tokens.
        min_freq: Training-split tokens seen fewer times become ``<unk>``.
        max_vocab_size: Keep at most this many of the most frequent tokens (plus the two
            specials).
        max_length: Tokens kept per text (longer texts are truncated at the end); default: the
            longest training text.
        num_folds: Number of cross-validation folds (e.g. 5 or 10); ``null`` for fixed splits.
        fold: Which fold is the test set, 0 ≤ fold < num_folds.
        val_split: Fraction of the non-test texts held out for validation; 0 validates on the
            test split.
        test_split: Fraction of the texts held out for testing (fixed splits only).
        seed: Seed of the splits and of the random vectors of words missing from
            ``vectors_path``.
        vectors_path: Optional word2vec/GloVe text file of pretrained word vectors (bring your
            own, e.g. GoogleNews-vectors converted to text, or glove.6B.300d.txt).
        batch_size: Texts per batch.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        data_dir: str = "data",
        source: Source = "review_polarity",
        path: str | None = None,
        test_path: str | None = None,
        text_field: str = "text",
        label_field: str = "label",
        labels: list[str] | None = None,
        download: bool = False,
        url: str | None = None,
        encoding: str = "utf-8",
        lowercase: bool = True,
        token_pattern: str = DEFAULT_TOKEN_PATTERN,
        min_freq: PositiveInt = 1,
        max_vocab_size: PositiveInt | None = None,
        max_length: PositiveInt | None = None,
        num_folds: int | None = None,
        fold: NonNegativeInt = 0,
        val_split: float = 0.1,
        test_split: float = 0.1,
        seed: int = 0,
        vectors_path: str | None = None,
        batch_size: PositiveInt = 50,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_source_options(source, path, test_path, download)
        self._decoder = TextDecoder(encoding)
        self._pattern = compile_token_pattern(token_pattern)
        check_split_options(num_folds, fold, val_split, test_split, test_path is not None)
        if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
            raise ConfigError(f"labels must list at least two distinct names, got {labels}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.source = source
        self.url = url or POLARITY_URLS.get(source)
        self.corpus = Corpus(source, self.data_dir, path, test_path, text_field, label_field,
                             self._decoder, f"set data.download true to fetch {self.url}, or "
                             f"download and extract it into {self.data_dir}", download)
        """The texts on disk, read on first use."""
        self.num_features: int | None = None  # the backbone gives the feature size
        self.vocab: Vocabulary | None = None
        """The vocabulary of the training split, after :meth:`setup`."""
        self.vectors: Tensor | None = None
        """Pretrained vectors ``(vocab_size, dim)`` after :meth:`setup`, if ``vectors_path``."""
        self.split_indices: dict[str, list[int]] = {}
        """Indices of each split's texts in the corpus (the test split's in ``test_path`` if
        given), after :meth:`setup`."""
        self._label_names: list[str] | None = list(labels) if labels is not None else None

    # ------------------------------------------------------------------ attributes
    @property
    def label_names(self) -> list[str]:
        """Label names in class-index order (reads the data if they must be discovered)."""
        if self._label_names is None:
            self._label_names = self.corpus.label_names()
        return self._label_names

    @property
    def num_outputs(self) -> int:
        """Number of classes (linked into the model's ``num_outputs`` by the CLI)."""
        return len(self.label_names)

    @property
    def vocab_size(self) -> int | None:
        """Size of the vocabulary (with the specials) once :meth:`setup` has run."""
        return None if self.vocab is None else len(self.vocab)

    @property
    def datasets(self) -> dict[str, TensorDataset]:
        """The token-id data set of each split (the same dict as :attr:`splits`)."""
        return self.splits  # type: ignore[return-value]

    @property
    def bad_bytes(self) -> dict[str, int]:
        """Number of undecodable bytes replaced in each file that had any."""
        return self._decoder.bad_bytes

    @property
    def num_bad_bytes(self) -> int:
        """Total number of undecodable bytes replaced while reading."""
        return sum(self.bad_bytes.values())

    def _read(self, which: Literal["main", "test"]) -> list[Record]:
        return self.corpus.read(which)

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Download and extract the polarity archive if asked and the data are missing."""
        files = polarity_files(self.data_dir, self.source)
        if not self.hparams.download or all(p.exists() for p in files):
            return
        assert self.url is not None
        name = self.url.rstrip("/").rsplit("/", 1)[-1] or f"{self.source}.tar.gz"
        fetch_archive(self.url, self.data_dir / name, self.data_dir, files)

    def setup(self, stage: str | None = None) -> None:
        """Read, split, build the vocabulary on the training split, encode and pad.

        Then hand :attr:`vocab_size` and :attr:`vectors` to the model's backbone if it is a
        :class:`VocabularyConsumer` (the only place that does).
        """
        if not self.splits:
            self._build()
        self._hand_vocabulary_to_backbone()

    def _build(self) -> None:
        hp = self.hparams
        parts = split_corpus(self.corpus, self.label_names, hp.seed, hp.num_folds, hp.fold,
                             hp.val_split, hp.test_split)
        self.split_indices = parts.indices
        self.vocab, datasets, length = encode_splits(parts, self._pattern, hp.lowercase,
                                                     hp.min_freq, hp.max_vocab_size,
                                                     hp.max_length)
        self.splits.update(datasets)
        if "val" not in self.splits:
            self.splits["val"] = self.splits["test"]  # val_split = 0
        found = None
        if hp.vectors_path is not None:
            self.vectors, found = load_vectors(self.corpus.resolve(hp.vectors_path), self.vocab,
                                               hp.lowercase, hp.seed)
        self._report(length, found)

    def _report(self, length: int, found: int | None) -> None:
        sizes = ", ".join(f"{name} {len(self.splits[name])}" for name in ("train", "val", "test"))
        vocab = self.vocab_size or 0
        message = (f"{self.source}: {sizes} texts; labels {self.label_names}; vocabulary "
                   f"{vocab}; max length {length}")
        if found is not None:
            message += f"; pretrained vectors for {found}/{vocab - 1} words"
        rank_zero_info(message)
        if self.bad_bytes:
            example, count = next(iter(self.bad_bytes.items()))
            rank_zero_warn(
                f"replaced {self.num_bad_bytes} undecodable byte(s) in {len(self.bad_bytes)} "
                f"file(s) (e.g. {example}: {count}); set data.encoding (e.g. latin-1) if the "
                f"files are not {self.hparams.encoding}"
            )

    def _hand_vocabulary_to_backbone(self) -> None:
        trainer = self.trainer
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if model is None or self.vocab_size is None:
            return
        backbone = getattr(model, "backbone", None)
        if isinstance(backbone, VocabularyConsumer):
            backbone.set_vocabulary(self.vocab_size, self.vectors)
        elif self.vectors is not None:
            rank_zero_warn(f"data.vectors_path is set but the model's backbone "
                           f"({type(backbone).__name__}) has no set_vocabulary(); the "
                           "pretrained vectors are not used")

    def state_dict(self) -> dict[str, Any]:
        """The vocabulary, so a checkpoint records what its embedding rows mean."""
        return {"vocabulary": list(self.vocab.itos)} if self.vocab is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that a checkpoint's vocabulary is the one rebuilt from the data."""
        saved = state_dict.get("vocabulary")
        if saved is None or self.vocab is None:
            return
        if list(saved) != self.vocab.itos:
            raise DatasetError(
                f"the checkpoint's vocabulary ({len(saved)} tokens) differs from the one built "
                f"from the data ({len(self.vocab)} tokens); use the same data, splits, seed, "
                "min_freq, max_vocab_size, lowercase and token_pattern as in training"
            )
