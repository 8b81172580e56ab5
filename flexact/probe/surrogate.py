"""The surrogate: predict an activation's trained metric from its training-free features.

Every candidate's feature vector (the activation's outputs on N(0, 1) and its Fisher spectrum
histogram, each block standardized) feeds a k-nearest-neighbour regressor (k = 3,
distance-weighted) fitted on the trained candidates, which predicts the rest. Bingham &
Miikkulainen (2023) first embed all candidates with UMAP; ``embedding="umap"`` does that
(umap-learn), ``"pca"`` a PCA. The default, ``"none"`` (k-NN on the standardized features), is
the better predictor in benchmarks/probe.py on all three tasks (held-out Spearman ρ 0.75 / 0.80
/ 0.89 against 0.68 / 0.73 / 0.87 with UMAP; benchmarks/RESULTS.md), so it is the default.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np

from flexact.errors import ConfigError

__all__ = ["Embedding", "predict", "standardize_blocks"]

Embedding = Literal["umap", "pca", "none"]


def standardize_blocks(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate feature blocks ``(n, d_i)``, each scaled to unit total variance.

    Each block counts alike whatever its width: a 1 000-value output distribution does not
    drown a 48-bin spectrum histogram.
    """
    from sklearn.preprocessing import StandardScaler

    out = []
    for block in blocks:
        block = np.nan_to_num(np.asarray(block, dtype=np.float64), posinf=0.0, neginf=0.0)
        scaled = StandardScaler().fit_transform(block)
        out.append(scaled / np.sqrt(max(block.shape[1], 1)))
    return np.concatenate(out, axis=1)


def _embed(features: np.ndarray, embedding: Embedding, n_components: int, seed: int) -> np.ndarray:
    if embedding == "none" or len(features) <= n_components + 2:
        return features
    if embedding == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=min(n_components, *features.shape), random_state=seed
                   ).fit_transform(features)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)  # n_jobs vs random_state
        warnings.filterwarnings("ignore", category=FutureWarning)
        import umap

        reducer = umap.UMAP(n_components=n_components, n_neighbors=min(15, len(features) - 1),
                            random_state=seed, init="random" if len(features) < 10 else
                            "spectral")
        return reducer.fit_transform(features)


def predict(features: np.ndarray, known: Sequence[int], values: Sequence[float], k: int = 3,
            embedding: Embedding = "none", n_components: int = 4, seed: int = 0) -> np.ndarray:
    """Predicted metric of every candidate from the measured ones.

    Args:
        features: ``(n, d)`` feature rows of all candidates (e.g. from
            :func:`standardize_blocks`).
        known: Row indices of the candidates already measured.
        values: Their measured metric, in the order of ``known``.
        k: Neighbours of the k-NN regression (fewer if fewer are known).
        embedding: ``none`` (the default, the benchmark's best), ``umap`` (the paper's) or
            ``pca``.
        n_components: Dimensions of the embedding.
        seed: Seed of the embedding.

    Returns:
        ``(n,)`` predictions; measured rows get the k-NN fit too (use their values directly).

    Raises:
        ConfigError: If nothing is measured, or ``known`` and ``values`` differ in length.
    """
    from sklearn.neighbors import KNeighborsRegressor

    known = list(known)
    if not known:
        raise ConfigError("the surrogate needs at least one measured candidate; train some "
                          "(flexact probe --train_top K) first")
    if len(known) != len(values):
        raise ConfigError(f"{len(known)} measured rows but {len(values)} values")
    space = _embed(np.asarray(features, dtype=np.float64), embedding, n_components, seed)
    knn = KNeighborsRegressor(n_neighbors=min(k, len(known)), weights="distance")
    knn.fit(space[known], np.asarray(values, dtype=np.float64))
    return knn.predict(space)
