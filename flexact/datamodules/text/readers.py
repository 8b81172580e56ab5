"""File readers: each on-disk layout becomes a list of ``(text, label name)`` records.

Four layouts are read: one text per line with one file per label (sentence polarity), one
sub-folder per label with one text per file (review polarity and ``folder``), a CSV/TSV table
with a header row, and JSON lines. Files are decoded by a :class:`TextDecoder`, which replaces
and counts undecodable bytes instead of failing. Every problem is a :class:`DatasetError`
naming the file (and line) and what to do.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from flexact.datamodules._common import DatasetError, decode_counting
from flexact.errors import ConfigError

__all__ = ["Decode", "Record", "TextDecoder", "read_folder", "read_jsonl", "read_lines",
           "read_table"]

Record = tuple[str, str]
"""One example: ``(text, label name)``."""

Decode = Callable[[Path], str]
"""Reads a file as text (a :class:`TextDecoder`)."""


class TextDecoder:
    """Reads files as text with one encoding, replacing and counting undecodable bytes.

    Args:
        encoding: Text encoding of the files.

    Raises:
        ConfigError: If Python knows no such encoding.
    """

    def __init__(self, encoding: str = "utf-8") -> None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ConfigError(f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1, "
                              "cp1252)") from None
        self.encoding = encoding
        self.bad_bytes: dict[str, int] = {}
        """Number of replaced bytes of each file that had any."""

    def __call__(self, path: Path) -> str:
        """The text of ``path``; undecodable bytes become U+FFFD and are counted."""
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DatasetError(f"cannot read {path} ({err})") from err
        text, bad = decode_counting(data, self.encoding)
        if bad:
            self.bad_bytes[str(path)] = bad
        return text


def read_lines(files: Sequence[Path], labels: Sequence[str], decode: Decode) -> list[Record]:
    """One text per non-blank line, the label of each file (sentence polarity)."""
    records = []
    for label, path in zip(labels, files, strict=True):
        for line in decode(path).splitlines():
            if line.strip():
                records.append((line, label))
    return records


def read_folder(folder: Path, decode: Decode) -> list[Record]:
    """One text per file, labelled by its sub-folder (hidden files and folders skipped)."""
    if not folder.is_dir():
        raise DatasetError(f"text folder {folder} not found; it should hold one sub-folder "
                           "per label with one text file per example")
    records = []
    for label_dir in sorted(p for p in folder.iterdir()
                            if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(p for p in label_dir.iterdir()
                           if p.is_file() and not p.name.startswith(".")):
            records.append((decode(file), label_dir.name))
    return records


def _require_file(path: Path, kind: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{kind} file {path} not found; check data.path "
                           "(relative paths are under data.data_dir)")


def read_table(path: Path, delimiter: str, text_field: str, label_field: str,
               decode: Decode) -> list[Record]:
    """One record per row of a CSV (comma) or TSV (tab) file with a header row.

    Args:
        path: The file.
        delimiter: The column separator.
        text_field: Column of the text.
        label_field: Column of the label.
        decode: Reads a file as text.

    Returns:
        The records, in file order.
    """
    kind = "csv" if delimiter == "," else "tsv"
    _require_file(path, kind)
    reader = csv.DictReader(io.StringIO(decode(path), newline=""), delimiter=delimiter)
    fields = reader.fieldnames or []
    for field in (text_field, label_field):
        if field not in fields:
            raise DatasetError(f"{path} has no column {field!r} (its header is {fields}); "
                               "set data.text_field / data.label_field")
    records = []
    try:
        for row in reader:
            text, label = row.get(text_field), row.get(label_field)
            if text is None or label is None or label.strip() == "":
                raise DatasetError(f"{path}, line {reader.line_num}: missing {text_field!r} "
                                   f"or {label_field!r}")
            records.append((text, label.strip()))
    except csv.Error as err:
        raise DatasetError(f"{path}, line {reader.line_num}: malformed {kind} ({err})") from err
    return records


def read_jsonl(path: Path, text_field: str, label_field: str, decode: Decode) -> list[Record]:
    """One record per JSON object line (blank lines skipped); labels may be numbers.

    Args:
        path: The file.
        text_field: Key of the text.
        label_field: Key of the label.
        decode: Reads a file as text.

    Returns:
        The records, in file order.
    """
    _require_file(path, "jsonl")
    records = []
    for number, line in enumerate(decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or text_field not in record \
                or label_field not in record:
            keys = list(record) if isinstance(record, dict) else type(record).__name__
            raise DatasetError(f"{path}, line {number}: expected an object with "
                               f"{text_field!r} and {label_field!r}, got {keys}; "
                               "set data.text_field / data.label_field")
        text, label = record[text_field], record[label_field]
        if not isinstance(text, str) or isinstance(label, (dict, list)) or label is None:
            raise DatasetError(f"{path}, line {number}: the text must be a string and the "
                               "label a string or number")
        records.append((text, str(label).lower() if isinstance(label, bool) else str(label)))
    return records
