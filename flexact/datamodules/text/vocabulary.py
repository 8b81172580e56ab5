"""``Vocabulary``: the token ↔ id mapping of the training split, and who consumes it.

:class:`VocabularyConsumer` is what a backbone must offer to be given the vocabulary by
:class:`~flexact.datamodules.TextDataModule` (see :mod:`flexact.datamodules.text.module`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["PAD", "UNK", "Vocabulary", "VocabularyConsumer"]

PAD, UNK = "<pad>", "<unk>"
"""The two special tokens, ids 0 and 1."""


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

    def encode_padded(self, texts: Sequence[Sequence[str]], length: int) -> Tensor:
        """Token ids of several texts, truncated at the end and padded with ``<pad>``.

        Args:
            texts: Token lists.
            length: Tokens kept per text.

        Returns:
            An int64 tensor ``(len(texts), length)``.
        """
        ids = torch.full((len(texts), length), self.pad_index, dtype=torch.long)
        for row, tokens in enumerate(texts):
            encoded = self.encode(tokens[:length])
            if encoded:
                ids[row, :len(encoded)] = torch.tensor(encoded)
        return ids


@runtime_checkable
class VocabularyConsumer(Protocol):
    """A backbone whose embedding is sized by the data's vocabulary (e.g. ``TextCNN``)."""

    def set_vocabulary(self, vocab_size: int, vectors: Tensor | None = None) -> None:
        """Build the embedding for ``vocab_size`` token ids, from ``vectors`` if given."""
