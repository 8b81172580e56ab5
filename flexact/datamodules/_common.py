"""Shared helpers of the real-data modules: one error type, downloads, archives, decoding.

Every problem with data on disk or on the network is raised as :class:`DatasetError`, a
:class:`~flexact.ConfigError`, so the CLI prints it as one line (``flexact: error: ...``) that
names the path and says what to do, never as a traceback from pickle, gzip or urllib.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import os
import shutil
import tarfile
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from flexact.errors import ConfigError

__all__ = [
    "DatasetError",
    "decode_counting",
    "download_file",
    "extract_archive",
    "fetch_archive",
    "file_md5",
    "gunzip",
    "missing_message",
    "raise_if_missing",
]

DOWNLOAD_TIMEOUT_S = 60.0
"""Seconds without any byte from the server before a download is abandoned."""

_USER_AGENT = "flexact (https://pypi.org/project/flexact)"


class DatasetError(ConfigError):
    """A data set is missing, truncated, corrupt, or could not be downloaded.

    The message names the file or URL and what to do about it. It is kept on one line (the
    reasons quoted from tarfile, gzip or urllib may span several), as the CLI prints one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def missing_message(what: str, paths: Iterable[Path], hint: str) -> str:
    """Message for data that is not on disk.

    Args:
        what: Name of the data set.
        paths: The files or folders that were looked for.
        hint: What the user can do (e.g. "set data.download true").

    Returns:
        One line naming every missing path.
    """
    listed = ", ".join(str(p) for p in paths)
    return f"{what} not found: missing {listed}; {hint}"


def raise_if_missing(what: str, missing: Sequence[Path], hint: str, download: bool) -> None:
    """Raise :class:`DatasetError` naming the missing paths, if there are any.

    Args:
        what: Name of the data set.
        missing: The files or folders that are not on disk (nothing happens when empty).
        hint: What the user can do when downloading is off.
        download: Whether downloading is on: the files should then be there, so the message
            says that the download did not complete instead of ``hint``.
    """
    if missing:
        hint = "the download did not complete; run again" if download else hint
        raise DatasetError(missing_message(what, missing, hint))


def file_md5(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file (integrity check only, not security)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str | None = None,
                  timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` atomically, optionally checking its MD5.

    The bytes go to ``dest.part`` first and are renamed only when complete and verified, so an
    interrupted download never looks like a finished one; a failed one leaves no file and none
    of the folders it created.

    Args:
        url: Address to fetch (``http``, ``https``, ``file``).
        dest: Where to store the file; parent folders are created.
        md5: Expected hex MD5 digest, or ``None`` to skip the check.
        timeout: Seconds to wait for the server before giving up.

    Returns:
        ``dest``.

    Raises:
        DatasetError: On any network or file-system failure, or an MD5 mismatch.
    """
    created = _make_folder(dest.parent)
    part = dest.with_name(dest.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as err:
        part.unlink(missing_ok=True)
        _remove_empty(created)
        reason = getattr(err, "reason", None) or err
        raise DatasetError(
            f"could not download {url} to {dest} ({reason}); check the network connection, or "
            f"fetch the file another way, put it at {dest}, and run again"
        ) from err
    if md5 is not None:
        got = file_md5(part)
        if got != md5:
            part.unlink(missing_ok=True)
            _remove_empty(created)
            raise DatasetError(
                f"the file downloaded from {url} has MD5 {got}, expected {md5}: it is corrupt or "
                "not the expected version; run again, or point the URL at another mirror (and "
                "turn off the MD5 check if that mirror serves different files)"
            )
    part.replace(dest)
    return dest


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # all created below
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: Iterable[Path]) -> None:
    """Remove the given folders, deepest first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _move_into(source: Path, dest: Path) -> None:
    """Move the contents of ``source`` into ``dest``, merging folders that exist in both."""
    for item in source.iterdir():
        target = dest / item.name
        if item.is_dir() and target.is_dir():
            _move_into(item, target)
        else:
            os.replace(item, target)


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract a ``.tar``, ``.tar.gz`` or ``.tgz`` archive into ``dest``.

    Member paths that would escape ``dest`` (absolute paths, ``..``, links outside) are refused.
    The archive is extracted into a hidden folder in ``dest`` first and moved into place when
    complete, so a truncated archive leaves no half-extracted data (nor a folder it created).

    Args:
        archive: The archive file.
        dest: Folder to extract into (created if needed).

    Raises:
        DatasetError: If the archive is truncated, corrupt or unsafe.
    """
    created = _make_folder(dest)
    temp = dest / f".{archive.name}.{os.getpid()}.extracting"
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(temp, filter="data")
        _move_into(temp, dest)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        shutil.rmtree(temp, ignore_errors=True)
        _remove_empty(created)
        raise DatasetError(
            f"the archive {archive} is truncated or corrupt ({err}); delete it and run again "
            "with download enabled, or replace it with a good copy"
        ) from err
    shutil.rmtree(temp, ignore_errors=True)


def fetch_archive(url: str, archive: Path, dest: Path, expected: Iterable[Path],
                  md5: str | None = None) -> None:
    """Download an archive (unless already there), extract it, and check what it held.

    Args:
        url: Address of the archive.
        archive: Where to keep it.
        dest: Folder to extract it into.
        expected: Files or folders the extracted archive must provide.
        md5: Expected hex MD5 digest of the download, or ``None`` to skip the check.

    Raises:
        DatasetError: If the download fails, the archive is corrupt, or it lacks an expected
            path.
    """
    if not archive.is_file():
        download_file(url, archive, md5)
    extract_archive(archive, dest)
    missing = [p for p in expected if not p.exists()]
    if missing:
        raise DatasetError(f"the archive {archive} (from {url}) does not contain "
                           f"{', '.join(str(p) for p in missing)}; delete it and check data.url")


def gunzip(source: Path, dest: Path) -> None:
    """Decompress a ``.gz`` file to ``dest`` (atomically).

    Raises:
        DatasetError: If the file is not valid gzip or is truncated.
    """
    part = dest.with_name(dest.name + ".part")
    try:
        with gzip.open(source, "rb") as fin, open(part, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except (OSError, EOFError, zlib.error) as err:
        part.unlink(missing_ok=True)
        raise DatasetError(
            f"{source} is truncated or not a gzip file ({err}); delete it and run again with "
            "download enabled"
        ) from err
    part.replace(dest)


# --------------------------------------------------------------------------- counted decoding
_decode_state = threading.local()
_ERROR_HANDLER = "flexact.replace_and_count"


def _replace_and_count(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeDecodeError):
        raise err
    _decode_state.count = getattr(_decode_state, "count", 0) + (err.end - err.start)
    return "\ufffd", err.end


codecs.register_error(_ERROR_HANDLER, _replace_and_count)


def decode_counting(data: bytes, encoding: str = "utf-8") -> tuple[str, int]:
    """Decode bytes, replacing undecodable bytes by U+FFFD and counting them.

    Args:
        data: Raw bytes.
        encoding: Any codec Python knows.

    Returns:
        ``(text, number of bytes that could not be decoded)``.
    """
    _decode_state.count = 0
    text = data.decode(encoding, errors=_ERROR_HANDLER)
    return text, _decode_state.count
