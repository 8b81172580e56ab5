"""Where each source's texts live, and the :class:`Corpus` that reads them once.

The two polarity data sets of Pang & Lee have an official layout under ``data_dir``; your own
corpus is a folder, a CSV/TSV file or a JSON-lines file at ``path`` (and optionally a separate
test set at ``test_path``). :class:`Corpus` checks that the polarity data are present, picks the
reader of :mod:`~flexact.datamodules.text.readers`, and caches the records.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from flexact.datamodules._common import DatasetError, raise_if_missing
from flexact.datamodules.text.readers import (
    Decode,
    Record,
    read_folder,
    read_jsonl,
    read_lines,
    read_table,
)
from flexact.errors import ConfigError

__all__ = [
    "POLARITY_LABELS",
    "POLARITY_URLS",
    "SOURCES",
    "Corpus",
    "Source",
    "check_source_options",
    "label_order",
    "polarity_files",
]

Source = Literal["review_polarity", "sentence_polarity", "folder", "csv", "tsv", "jsonl"]
"""The data sets and file formats :class:`~flexact.datamodules.TextDataModule` reads."""

POLARITY_URLS: dict[str, str] = {
    "sentence_polarity": "https://www.cs.cornell.edu/people/pabo/movie-review-data/"
                         "rt-polaritydata.tar.gz",
    "review_polarity": "https://www.cs.cornell.edu/people/pabo/movie-review-data/"
                       "review_polarity.tar.gz",
}
"""The official archives of Pang & Lee's movie-review data."""

POLARITY_LABELS = ("neg", "pos")
"""The labels of the polarity data, in class-index order."""

SOURCES: tuple[str, ...] = (*POLARITY_URLS, "folder", "csv", "tsv", "jsonl")
"""Every valid ``source``."""

def check_source_options(source: str, path: str | None, test_path: str | None,
                         download: bool) -> None:
    """Check where :class:`~flexact.datamodules.TextDataModule` is told to read ``source``.

    Args:
        source: The data set or file format.
        path: The user's corpus (file or folder), if any.
        test_path: The user's separate test file or folder, if any.
        download: Whether the data are to be downloaded.

    Raises:
        ConfigError: If the source is unknown, or the other arguments do not fit it.
    """
    polarity = source in POLARITY_URLS
    if source not in SOURCES:
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


def polarity_files(data_dir: Path, source: str) -> list[Path]:
    """The two files (sentence polarity) or folders (review polarity), ``neg`` then ``pos``."""
    if source == "sentence_polarity":
        folder = data_dir / "rt-polaritydata"
        return [folder / f"rt-polarity.{label}" for label in POLARITY_LABELS]
    return [data_dir / "txt_sentoken" / label for label in POLARITY_LABELS]


def label_order(labels: Iterable[str]) -> list[str]:
    """Distinct labels, sorted numerically when all are integers, else alphabetically."""
    unique = set(labels)
    if unique and all(re.fullmatch(r"-?\d+", label) for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


class Corpus:
    """The texts of one source: located, checked, read once per part.

    Args:
        source: The data set or file format (one of :data:`SOURCES`).
        data_dir: Folder of the polarity data, and the base of relative paths.
        path: The user's corpus (file or folder; default: ``data_dir`` itself).
        test_path: The user's separate test file or folder, if any.
        text_field: Column or key of the text (tables and JSON lines).
        label_field: Column or key of the label (tables and JSON lines).
        decode: Reads a file as text.
        hint: What to do when the polarity data are missing.
        download: Whether the data were to be downloaded (the missing-data message says so).
    """

    def __init__(self, source: str, data_dir: Path, path: str | None, test_path: str | None,
                 text_field: str, label_field: str, decode: Decode, hint: str,
                 download: bool) -> None:
        self.source = source
        self.data_dir = data_dir
        self.paths = {"main": path, "test": test_path}
        self.fields = (text_field, label_field)
        self.decode = decode
        self.hint = hint
        self.download = download
        self._records: dict[str, list[Record]] = {}

    def resolve(self, path: str | None) -> Path:
        """``path`` under ``data_dir`` unless absolute; ``data_dir`` for ``None``."""
        if path is None:
            return self.data_dir
        p = Path(path)
        return p if p.is_absolute() else self.data_dir / p

    def location(self, which: Literal["main", "test"]) -> Path:
        """The file or folder of the main corpus or of the test set, for messages."""
        if self.source in POLARITY_URLS:
            return polarity_files(self.data_dir, self.source)[0].parent
        return self.resolve(self.paths[which])

    def read(self, which: Literal["main", "test"]) -> list[Record]:
        """``(text, label name)`` records of the main corpus or of ``test_path`` (cached)."""
        if which in self._records:
            return self._records[which]
        source, (text_field, label_field) = self.source, self.fields
        if source in POLARITY_URLS:
            files = polarity_files(self.data_dir, source)
            raise_if_missing(source.replace("_", " ") + " data",
                             [p for p in files if not p.exists()], self.hint, self.download)
            records = (read_lines(files, POLARITY_LABELS, self.decode)
                       if source == "sentence_polarity" else
                       read_folder(files[0].parent, self.decode))
        elif source == "folder":
            records = read_folder(self.location(which), self.decode)
        elif source == "jsonl":
            records = read_jsonl(self.location(which), text_field, label_field, self.decode)
        else:
            records = read_table(self.location(which), "," if source == "csv" else "\t",
                                 text_field, label_field, self.decode)
        if not records:
            raise DatasetError(f"no texts found in {self.location(which)}")
        self._records[which] = records
        return records

    def label_names(self) -> list[str]:
        """The labels in class-index order: ``neg, pos``, or those found in the main corpus."""
        if self.source in POLARITY_URLS:
            return list(POLARITY_LABELS)
        names = label_order(label for _, label in self.read("main"))
        if len(names) < 2:
            raise DatasetError(f"{self.resolve(self.paths['main'])} has {len(names)} distinct "
                               "label(s); classification needs at least two")
        return names
