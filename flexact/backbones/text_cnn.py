"""Kim (2014) convolutional sentence classifier, as a feature extractor."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch
from torch import Tensor, nn

from flexact.backbones._activation import build_activation, check_backbone_activation
from flexact.errors import ConfigError

__all__ = ["TextCNN"]


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ConfigError(f"TextCNN's {name} must be a positive int, got {value!r}")


class TextCNN(nn.Module):
    """Kim (2014): embedding → parallel 1-D convolutions → act → max over time → dropout.

    Returns the concatenated pooled features (``len(filter_sizes) · num_filters``, 300 by
    default); the model's head classifies them.

    The embedding is built when the vocabulary is known: from ``vocab_size`` if given, else by
    :meth:`set_vocabulary`. Under Lightning, :class:`~flexact.datamodules.TextDataModule` calls
    it from its ``setup`` (before the optimizer is created) on the model's ``backbone``, with its
    ``vocab_size`` and pretrained ``vectors``; outside Lightning, call it yourself. Loading a
    state dict also builds it, with the saved shape.

    Args:
        vocab_size: Number of token ids (with ``<pad>`` and ``<unk>``); ``null`` to take it from
            the data module (which calls :meth:`set_vocabulary`).
        embedding_dim: Size of the word vectors (300 for word2vec GoogleNews).
        filter_sizes: Widths (in tokens) of the convolution filters.
        num_filters: Feature maps per filter width.
        activation: Activation after each convolution, by registry name, or ``flexact`` /
            ``flexact_channel``.
        activation_kwargs: Keyword arguments of the activation.
        dropout: Dropout probability on the pooled features.
        freeze_embedding: Do not train the word vectors (Kim's "static" model, meant for
            pretrained vectors).
        padding_idx: Token id of ``<pad>`` (its vector stays zero).
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        embedding_dim: int = 300,
        filter_sizes: Sequence[int] = (3, 4, 5),
        num_filters: int = 100,
        activation: str = "relu",
        activation_kwargs: dict[str, Any] | None = None,
        dropout: float = 0.5,
        freeze_embedding: bool = False,
        padding_idx: int = 0,
    ) -> None:
        super().__init__()
        check_backbone_activation(activation)
        for name, value in (("embedding_dim", embedding_dim), ("num_filters", num_filters)):
            _check_positive(name, value)
        if not filter_sizes or any(k < 1 for k in filter_sizes):
            raise ConfigError(f"filter_sizes must be positive ints, got {list(filter_sizes)}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout must lie in [0, 1), got {dropout}")
        self.embedding_dim = embedding_dim
        self.freeze_embedding = freeze_embedding
        self.padding_idx = padding_idx
        self.embedding: nn.Embedding | None = None
        self.filter_sizes = tuple(filter_sizes)
        self.convs = nn.ModuleList(nn.Conv1d(embedding_dim, num_filters, k)
                                   for k in self.filter_sizes)
        self.acts = nn.ModuleList(build_activation(activation, num_filters, activation_kwargs)
                                  for _ in self.filter_sizes)
        self.dropout = nn.Dropout(dropout)
        self.out_features = len(self.filter_sizes) * num_filters
        """Size of the feature vector (the model's head reads it)."""
        if vocab_size is not None:
            self.set_vocabulary(vocab_size)
        self.register_load_state_dict_pre_hook(self._embedding_from_state)

    @property
    def vocab_size(self) -> int | None:
        """Rows of the embedding, or ``None`` before the vocabulary is known."""
        return None if self.embedding is None else self.embedding.num_embeddings

    def set_vocabulary(self, vocab_size: int, vectors: Tensor | None = None) -> None:
        """Build the embedding for ``vocab_size`` token ids (once).

        Called again with the same size it changes nothing (the trained vectors stay).

        Args:
            vocab_size: Number of token ids.
            vectors: Optional ``(vocab_size, embedding_dim)`` initial vectors; otherwise
                uniform(−0.25, 0.25) as in Kim (2014). The ``<pad>`` row is zero either way.

        Raises:
            ConfigError: If the size is not positive, or it or the vectors' shape disagree with
                the model.
        """
        _check_positive("vocab_size", vocab_size)
        if self.embedding is not None:
            if self.embedding.num_embeddings != vocab_size:
                raise ConfigError(
                    f"TextCNN has an embedding for {self.embedding.num_embeddings} tokens but "
                    f"the data's vocabulary has {vocab_size}; leave model vocab_size unset (the "
                    "data module sets it) or build the vocabulary the same way"
                )
            return
        if vectors is not None and tuple(vectors.shape) != (vocab_size, self.embedding_dim):
            raise ConfigError(
                f"pretrained vectors have shape {tuple(vectors.shape)}, the TextCNN expects "
                f"({vocab_size}, {self.embedding_dim}); set the backbone's embedding_dim to "
                f"{vectors.shape[-1]}"
            )
        if not 0 <= self.padding_idx < vocab_size:
            raise ConfigError(f"padding_idx {self.padding_idx} is outside the vocabulary "
                              f"of {vocab_size}")
        embedding = nn.Embedding(vocab_size, self.embedding_dim, padding_idx=self.padding_idx)
        with torch.no_grad():
            if vectors is not None:
                embedding.weight.copy_(vectors)
            else:
                embedding.weight.uniform_(-0.25, 0.25)
            embedding.weight[self.padding_idx].zero_()
        embedding.weight.requires_grad_(not self.freeze_embedding)
        reference = self.convs[0].weight
        self.embedding = embedding.to(device=reference.device)

    def _embedding_from_state(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                              *args: Any) -> None:
        weight = state_dict.get(prefix + "embedding.weight")
        if weight is None:
            return
        if self.embedding is not None and self.embedding.weight.shape != weight.shape:
            raise ConfigError(
                f"the checkpoint's embedding has {weight.shape[0]} tokens, the vocabulary built "
                f"from the data has {self.embedding.num_embeddings}: use the same data, splits, "
                "seed and vocabulary options as in training"
            )
        if self.embedding is None:
            self.set_vocabulary(int(weight.shape[0]))

    def forward(self, tokens: Tensor) -> Tensor:
        """Pooled features ``(B, out_features)`` of token ids ``(B, L)``."""
        if self.embedding is None:
            raise RuntimeError("TextCNN has no embedding yet: pass vocab_size, call "
                               "set_vocabulary(), or train with TextDataModule")
        x = self.embedding(tokens).transpose(1, 2)  # (B, E, L)
        shortfall = max(self.filter_sizes) - x.shape[-1]
        if shortfall > 0:  # texts shorter than the widest filter
            x = nn.functional.pad(x, (0, shortfall))
        pooled = [act(conv(x)).amax(dim=-1) for conv, act in zip(self.convs, self.acts,
                                                                  strict=True)]
        return self.dropout(torch.cat(pooled, dim=1))
