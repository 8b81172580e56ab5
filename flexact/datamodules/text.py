"""``TextDataModule``: sentence / document polarity classification (METHOD.md §4, TextCNN).

Reads the movie-review polarity data (sentence polarity v1.0 and review polarity v2.0 of Pang &
Lee) or any corpus of yours, tokenizes it with a regular expression, builds the vocabulary on the
training split only, and serves padded token-id tensors.

The vocabulary size is known only once the data are read (in ``setup``), after the model is
built. So a backbone that needs it (:class:`~flexact.backbones.TextCNN`) builds its embedding
lazily: in ``setup`` this module calls ``set_vocabulary(size, vectors)`` on every submodule of
the attached LightningModule that has such a method. Lightning runs ``setup`` before it creates
the optimizer, so the embedding is trained like any other parameter.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import TensorDataset

from flexact.datamodules._common import (
    DatasetError,
    decode_counting,
    fetch_archive,
    raise_if_missing,
)
from flexact.datamodules.base import SplitDataModule
from flexact.errors import ConfigError

__all__ = [
    "DEFAULT_TOKEN_PATTERN",
    "POLARITY_URLS",
    "TextDataModule",
    "Vocabulary",
    "load_vectors",
    "tokenize",
]

Source = Literal["review_polarity", "sentence_polarity", "folder", "csv", "tsv", "jsonl"]

POLARITY_URLS: dict[str, str] = {
    "sentence_polarity": "https://www.cs.cornell.edu/people/pabo/movie-review-data/"
                         "rt-polaritydata.tar.gz",
    "review_polarity": "https://www.cs.cornell.edu/people/pabo/movie-review-data/"
                       "review_polarity.tar.gz",
}
"""The official archives of Pang & Lee's movie-review data."""

DEFAULT_TOKEN_PATTERN = r"\w+(?:'\w+)?|[^\w\s]"
"""Words (with an optional apostrophe suffix, "don't") or single punctuation marks."""

PAD, UNK = "<pad>", "<unk>"
_POLARITY_LABELS = ("neg", "pos")


def tokenize(text: str, pattern: str | re.Pattern[str] = DEFAULT_TOKEN_PATTERN,
             lowercase: bool = True) -> list[str]:
    """Split a text into tokens with a regular expression.

    Args:
        text: The text.
        pattern: Regular expression whose matches are the tokens.
        lowercase: Lower-case the text first.

    Returns:
        The tokens, in order.
    """
    if lowercase:
        text = text.lower()
    return re.findall(pattern, text)


class Vocabulary:
    """Token ↔ id mapping with ``<pad>`` = 0 and ``<unk>`` = 1.

    Args:
        tokens: The tokens after the two specials, in id order.
    """

    pad_index = 0
    unk_index = 1

    def __init__(self, tokens: Iterable[str]) -> None:
        self.itos: list[str] = [PAD, UNK]
        self.itos.extend(t for t in tokens if t not in (PAD, UNK))
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: Iterable[Sequence[str]], min_freq: int = 1,
              max_size: int | None = None) -> Vocabulary:
        """Build from tokenized texts: most frequent first, ties alphabetical.

        Args:
            texts: Token lists (the training split only).
            min_freq: Tokens seen fewer times become ``<unk>``.
            max_size: Keep at most this many tokens besides the two specials.

        Returns:
            The vocabulary.
        """
        counts = Counter(t for tokens in texts for t in tokens)
        ranked = sorted((t for t, c in counts.items() if c >= min_freq),
                        key=lambda t: (-counts[t], t))
        return cls(ranked[:max_size] if max_size is not None else ranked)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Token ids, ``<unk>`` for unknown tokens."""
        return [self.stoi.get(t, self.unk_index) for t in tokens]


def _open_text_lines(path: Path) -> Iterable[bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        yield from f


def load_vectors(path: str | Path, vocab: Vocabulary, lowercase: bool = True,
                 seed: int = 0) -> tuple[Tensor, int]:
    """Embedding matrix for ``vocab`` from a word2vec or GloVe *text* file.

    Each line is ``word v1 v2 … vd``; a word2vec header line ``count dim`` is skipped. Words of the
    vocabulary that the file lacks get uniform(−0.25, 0.25) vectors (Kim 2014); ``<pad>`` gets
    zeros. With ``lowercase``, a vector for "Movie" also serves "movie" unless "movie" has its
    own. Malformed lines are skipped and counted. ``.gz`` files are read directly.

    Args:
        path: The vectors file.
        vocab: The vocabulary to cover.
        lowercase: Fall back to lower-cased file words.
        seed: Seed of the random vectors.

    Returns:
        ``(vectors (len(vocab), d), number of vocabulary words found in the file)``.

    Raises:
        DatasetError: If the file is missing, binary, or holds no vectors.
    """
    path = Path(path)
    if path.suffix == ".bin" or path.name.endswith(".bin.gz"):
        raise DatasetError(
            f"{path} looks like a binary word2vec file; convert it to text first (gensim: "
            "KeyedVectors.load_word2vec_format(path, binary=True).save_word2vec_format(out, "
            "binary=False))"
        )
    if not path.is_file():
        raise DatasetError(f"word vectors file {path} not found; check data.vectors_path")
    found: dict[int, list[float]] = {}
    exact: set[int] = set()
    dim: int | None = None
    bad_lines = 0
    try:
        for number, raw in enumerate(_open_text_lines(path)):
            line, _ = decode_counting(raw)
            parts = line.rstrip("\r\n").rstrip(" ").split(" ")
            if number == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                dim = int(parts[1])  # word2vec text header
                continue
            if len(parts) < 2:
                bad_lines += 1
                continue
            if dim is None:
                dim = len(parts) - 1
            if len(parts) - 1 != dim:
                bad_lines += 1
                continue
            word = parts[0]
            index = vocab.stoi.get(word)
            is_exact = index is not None
            if index is None and lowercase:
                index = vocab.stoi.get(word.lower())
            if index is None or index in exact or (not is_exact and index in found):
                continue
            try:
                found[index] = [float(v) for v in parts[1:]]
            except ValueError:
                bad_lines += 1
                continue
            if is_exact:
                exact.add(index)
    except (OSError, EOFError) as err:
        raise DatasetError(f"cannot read word vectors from {path} ({err})") from err
    if dim is None or dim < 1:
        raise DatasetError(f"{path} holds no word vectors (expected lines 'word v1 v2 ...')")
    if bad_lines:
        rank_zero_warn(f"{path}: skipped {bad_lines} malformed line(s)")
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.empty(len(vocab), dim).uniform_(-0.25, 0.25, generator=generator)
    vectors[vocab.pad_index] = 0.0
    found.pop(vocab.pad_index, None)
    if found:
        rows = torch.tensor(list(found), dtype=torch.long)
        vectors[rows] = torch.tensor(list(found.values()), dtype=torch.float32)
    return vectors, len(found)


def _label_order(labels: Iterable[str]) -> list[str]:
    unique = set(labels)
    if unique and all(re.fullmatch(r"-?\d+", label) for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


class TextDataModule(SplitDataModule):
    """Text classification: polarity data or your corpus, as padded token-id tensors.

    Sources (``source``):

    - ``review_polarity``: review polarity v2.0, 2 000 movie reviews in
      ``<data_dir>/txt_sentoken/{neg,pos}/*.txt`` (the Farhadi et al. / METHOD.md §4 set).
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
        polarity = source in POLARITY_URLS
        if source not in (*POLARITY_URLS, "folder", "csv", "tsv", "jsonl"):
            raise ConfigError(f"unknown source {source!r}")
        if download and not polarity:
            raise ConfigError(f"download=true fetches only the polarity data sets, not a "
                              f"{source} corpus; set data.download false")
        if polarity and (path is not None or test_path is not None):
            raise ConfigError(f"source={source} reads the official layout under data_dir; "
                              "path and test_path are for your own corpus (source folder, csv, "
                              "tsv or jsonl)")
        if source in ("csv", "tsv", "jsonl") and path is None:
            raise ConfigError(f"source={source} needs data.path, the {source} file")
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ConfigError(f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1, "
                              "cp1252)") from None
        try:
            self._pattern = re.compile(token_pattern)
        except re.error as err:
            raise ConfigError(f"token_pattern {token_pattern!r} is not a valid regular "
                              f"expression: {err}") from None
        if num_folds is not None:
            if num_folds < 2:
                raise ConfigError(f"num_folds must be >= 2 (or null for fixed splits), "
                                  f"got {num_folds}")
            if not 0 <= fold < num_folds:
                raise ConfigError(f"fold must lie in [0, {num_folds}), got {fold}")
            if test_path is not None:
                raise ConfigError("give either num_folds (cross-validation) or test_path "
                                  "(a fixed test set), not both")
        if not 0 <= val_split < 1:
            raise ConfigError(f"val_split must be a fraction in [0, 1), got {val_split}")
        if num_folds is None and test_path is None and not 0 < test_split < 1:
            raise ConfigError(f"test_split must be a fraction in (0, 1), got {test_split}")
        if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
            raise ConfigError(f"labels must list at least two distinct names, got {labels}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.source = source
        self.url = url or POLARITY_URLS.get(source)
        self.num_features: int | None = None  # the backbone gives the feature size
        self.vocab: Vocabulary | None = None
        self.vectors: Tensor | None = None
        self.split_indices: dict[str, list[int]] = {}
        """Indices of each split's texts in the corpus (the test split's in ``test_path`` if
        given), after :meth:`setup`."""
        self.bad_bytes: dict[str, int] = {}
        self._records: dict[str, list[tuple[str, str]]] = {}
        self._label_names: list[str] | None = list(labels) if labels is not None else None
        self._vocab_checked: list[str] | None = None

    # ------------------------------------------------------------------ paths and labels
    def _resolve(self, path: str | None) -> Path:
        if path is None:
            return self.data_dir
        p = Path(path)
        return p if p.is_absolute() else self.data_dir / p

    def _polarity_files(self) -> list[Path]:
        if self.source == "sentence_polarity":
            folder = self.data_dir / "rt-polaritydata"
            return [folder / f"rt-polarity.{label}" for label in _POLARITY_LABELS]
        return [self.data_dir / "txt_sentoken" / label for label in _POLARITY_LABELS]

    @property
    def label_names(self) -> list[str]:
        """Label names in class-index order (reads the data if they must be discovered)."""
        if self._label_names is None:
            if self.source in POLARITY_URLS:
                self._label_names = list(_POLARITY_LABELS)
            else:
                self._label_names = _label_order(label for _, label in self._read("main"))
                if len(self._label_names) < 2:
                    raise DatasetError(
                        f"{self._resolve(self.hparams.path)} has {len(self._label_names)} "
                        "distinct label(s); classification needs at least two"
                    )
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
    def num_bad_bytes(self) -> int:
        """Total number of undecodable bytes replaced while reading."""
        return sum(self.bad_bytes.values())

    # ------------------------------------------------------------------ reading
    def _decode(self, path: Path) -> str:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DatasetError(f"cannot read {path} ({err})") from err
        text, bad = decode_counting(data, self.hparams.encoding)
        if bad:
            self.bad_bytes[str(path)] = bad
        return text

    def _read(self, which: Literal["main", "test"]) -> list[tuple[str, str]]:
        """``(text, label name)`` records of the main corpus or of ``test_path`` (cached)."""
        if which in self._records:
            return self._records[which]
        if self.source == "sentence_polarity":
            records = self._read_sentence_polarity()
        elif self.source == "review_polarity":
            records = self._read_folder(self.data_dir / "txt_sentoken")
        else:
            location = self._resolve(self.hparams.path if which == "main"
                                     else self.hparams.test_path)
            if self.source == "folder":
                records = self._read_folder(location)
            elif self.source == "jsonl":
                records = self._read_jsonl(location)
            else:
                records = self._read_table(location, "," if self.source == "csv" else "\t")
        if not records:
            raise DatasetError(f"no texts found in {self._location(which)}")
        self._records[which] = records
        return records

    def _location(self, which: str) -> Path:
        if self.source in POLARITY_URLS:
            return self._polarity_files()[0].parent
        return self._resolve(self.hparams.path if which == "main" else self.hparams.test_path)

    def _missing_polarity(self) -> None:
        raise_if_missing(self.source.replace("_", " ") + " data",
                         [p for p in self._polarity_files() if not p.exists()],
                         f"set data.download true to fetch {self.url}, or download and extract "
                         f"it into {self.data_dir}", self.hparams.download)

    def _read_sentence_polarity(self) -> list[tuple[str, str]]:
        self._missing_polarity()
        records = []
        for label, path in zip(_POLARITY_LABELS, self._polarity_files(), strict=True):
            for line in self._decode(path).splitlines():
                if line.strip():
                    records.append((line, label))
        return records

    def _read_folder(self, folder: Path) -> list[tuple[str, str]]:
        if self.source == "review_polarity":
            self._missing_polarity()
        if not folder.is_dir():
            raise DatasetError(f"text folder {folder} not found; it should hold one sub-folder "
                               "per label with one text file per example")
        records = []
        for label_dir in sorted(p for p in folder.iterdir()
                                if p.is_dir() and not p.name.startswith(".")):
            for file in sorted(p for p in label_dir.iterdir()
                               if p.is_file() and not p.name.startswith(".")):
                records.append((self._decode(file), label_dir.name))
        return records

    def _require_file(self, path: Path) -> None:
        if not path.is_file():
            raise DatasetError(f"{self.source} file {path} not found; check data.path "
                               "(relative paths are under data.data_dir)")

    def _read_table(self, path: Path, delimiter: str) -> list[tuple[str, str]]:
        self._require_file(path)
        hp = self.hparams
        text = self._decode(path)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        fields = reader.fieldnames or []
        for field in (hp.text_field, hp.label_field):
            if field not in fields:
                raise DatasetError(f"{path} has no column {field!r} (its header is {fields}); "
                                   "set data.text_field / data.label_field")
        records = []
        try:
            for row in reader:
                text_value, label = row.get(hp.text_field), row.get(hp.label_field)
                if text_value is None or label is None or label.strip() == "":
                    raise DatasetError(f"{path}, line {reader.line_num}: missing "
                                       f"{hp.text_field!r} or {hp.label_field!r}")
                records.append((text_value, label.strip()))
        except csv.Error as err:
            raise DatasetError(f"{path}, line {reader.line_num}: malformed {self.source} "
                               f"({err})") from err
        return records

    def _read_jsonl(self, path: Path) -> list[tuple[str, str]]:
        self._require_file(path)
        hp = self.hparams
        records = []
        for number, line in enumerate(self._decode(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or hp.text_field not in record \
                    or hp.label_field not in record:
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                raise DatasetError(f"{path}, line {number}: expected an object with "
                                   f"{hp.text_field!r} and {hp.label_field!r}, got {keys}; "
                                   "set data.text_field / data.label_field")
            text_value, label = record[hp.text_field], record[hp.label_field]
            if not isinstance(text_value, str) or isinstance(label, (dict, list)) \
                    or label is None:
                raise DatasetError(f"{path}, line {number}: the text must be a string and the "
                                   "label a string or number")
            label = str(label).lower() if isinstance(label, bool) else str(label)
            records.append((text_value, label))
        return records

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Download and extract the polarity archive if asked and the data are missing."""
        if not self.hparams.download or all(p.exists() for p in self._polarity_files()):
            return
        assert self.url is not None
        name = self.url.rstrip("/").rsplit("/", 1)[-1] or f"{self.source}.tar.gz"
        fetch_archive(self.url, self.data_dir / name, self.data_dir, self._polarity_files())

    def _splits(self, labels: list[int]) -> dict[str, list[int]]:
        """Stratified, seeded train/val/test indices into the main corpus."""
        hp = self.hparams
        generator = torch.Generator().manual_seed(hp.seed)
        by_label: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            by_label.setdefault(label, []).append(i)
        groups = {}
        for label in sorted(by_label):
            members = by_label[label]
            order = torch.randperm(len(members), generator=generator).tolist()
            groups[label] = [members[j] for j in order]
        split: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for members in groups.values():
            if hp.num_folds is not None:
                test = members[hp.fold::hp.num_folds]
                rest = [m for k, m in enumerate(members) if k % hp.num_folds != hp.fold]
            elif hp.test_path is not None:
                test, rest = [], members
            else:
                n_test = _fraction(len(members), hp.test_split)
                test, rest = members[:n_test], members[n_test:]
            n_val = _fraction(len(rest), hp.val_split)
            split["test"] += test
            split["val"] += rest[:n_val]
            split["train"] += rest[n_val:]
        return {name: sorted(indices) for name, indices in split.items()}

    def setup(self, stage: str | None = None) -> None:
        """Read, split, build the vocabulary on the training split, encode and pad.

        Also hands the vocabulary (and any pretrained vectors) to the attached model's
        ``set_vocabulary`` methods.
        """
        if not self.splits:
            self._build()
        self._configure_model()

    def _build(self) -> None:
        hp = self.hparams
        names = self.label_names
        index = {name: i for i, name in enumerate(names)}
        main = self._read("main")
        main_labels = [self._label_index(label, index, "main") for _, label in main]
        splits = self._splits(main_labels)
        self.split_indices = dict(splits)
        texts = {name: [main[i][0] for i in ids] for name, ids in splits.items()}
        targets = {name: [main_labels[i] for i in ids] for name, ids in splits.items()}
        if hp.test_path is not None:
            test = self._read("test")
            texts["test"] = [t for t, _ in test]
            self.split_indices["test"] = list(range(len(test)))
            targets["test"] = [self._label_index(label, index, "test") for _, label in test]
        if not texts["train"] or not texts["test"]:
            raise DatasetError(f"{self._location('main')}: {len(main)} texts are too few for the "
                               "requested splits; add data or change the split fractions")
        tokens = {name: [tokenize(t, self._pattern, hp.lowercase) for t in ts]
                  for name, ts in texts.items()}
        self.vocab = Vocabulary.build(tokens["train"], hp.min_freq, hp.max_vocab_size)
        length = hp.max_length or max(1, max(len(t) for t in tokens["train"]))
        for name in ("train", "val", "test"):
            if not tokens[name]:
                continue
            ids = torch.zeros(len(tokens[name]), length, dtype=torch.long)
            for row, toks in enumerate(tokens[name]):
                encoded = self.vocab.encode(toks[:length])
                if encoded:
                    ids[row, :len(encoded)] = torch.tensor(encoded)
            self.splits[name] = TensorDataset(ids, torch.tensor(targets[name]))
        if "val" not in self.splits:
            self.splits["val"] = self.splits["test"]  # val_split = 0
        found = None
        if hp.vectors_path is not None:
            self.vectors, found = load_vectors(self._resolve(hp.vectors_path), self.vocab,
                                               hp.lowercase, hp.seed)
        self._report(length, found)

    def _label_index(self, label: str, index: dict[str, int], which: str) -> int:
        if label not in index:
            raise DatasetError(f"{self._location(which)}: label {label!r} is not among "
                               f"data.labels {list(index)}")
        return index[label]

    def _report(self, length: int, found: int | None) -> None:
        sizes = ", ".join(f"{name} {len(self.splits[name])}" for name in ("train", "val", "test"))
        vocab = len(self.vocab) if self.vocab is not None else 0
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

    def _configure_model(self) -> None:
        trainer = self.trainer
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if model is None or self.vocab is None:
            return
        for module in model.modules():
            set_vocabulary = getattr(module, "set_vocabulary", None)
            if callable(set_vocabulary):
                set_vocabulary(len(self.vocab), self.vectors)

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


def _fraction(n: int, fraction: float) -> int:
    """``round(n · fraction)``, at least 1 when the fraction is positive and ``n`` ≥ 2."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, math.floor(n * fraction + 0.5)))
