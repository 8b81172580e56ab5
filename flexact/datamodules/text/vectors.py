"""``load_vectors``: pretrained word vectors (word2vec or GloVe text files) for a vocabulary."""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from flexact.datamodules._common import DatasetError, decode_counting
from flexact.datamodules.text.vocabulary import Vocabulary

__all__ = ["load_vectors"]


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
