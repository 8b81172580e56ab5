"""Tiny data sets in the genuine on-disk formats, for smoke tests without downloading.

Each writer produces the exact layout and file format the data modules read (CIFAR-10 python
pickles, MNIST idx files, the polarity folders and files), with classes that differ by a visible
pattern, so a model can actually learn them::

    from flexact.tools.fake_data import write_cifar10
    write_cifar10("/tmp/fake")
    # then: flexact fit --config configs/resnet18.yaml --data.data_dir /tmp/fake
"""

from __future__ import annotations

import gzip
import pickle
import random
from pathlib import Path

import numpy as np

__all__ = [
    "pattern_images",
    "polarity_texts",
    "write_cifar10",
    "write_cifar_batches",
    "write_idx",
    "write_mnist",
    "write_review_polarity",
    "write_sentence_polarity",
]

# Ten well-separated colours (RGB) for the ten CIFAR-like classes.
_PALETTE = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [250, 250, 250],
], dtype=np.float32)


def pattern_images(labels: np.ndarray, channels: int, size: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Images whose class shows as a pattern robust to small shifts and flips.

    Colour images: a class colour modulated by stripes of a class-specific frequency. Grey
    images: a class-specific template of 4×4-pixel blocks. Plus noise.

    Args:
        labels: Class of each image (0–9).
        channels: 3 (colour) or 1 (grey).
        size: Height = width.
        rng: Random generator.

    Returns:
        uint8 array ``(N, channels, size, size)``.
    """
    n = len(labels)
    coords = np.arange(size, dtype=np.float32)
    out = np.empty((n, channels, size, size), dtype=np.float32)
    for i, c in enumerate(labels):
        c = int(c)
        if channels == 3:
            freq = 1 + (c % 3)
            stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * coords / size + rng.uniform(0, 6.3))
            pattern = (stripes[:, None] if c % 2 else stripes[None, :]) * np.ones((size, size))
            out[i] = _PALETTE[c][:, None, None] * (0.6 + 0.4 * pattern)[None]
        else:
            template = np.random.default_rng(1000 + c).random((size // 4 + 1,) * 2) > 0.5
            blocks = np.kron(template, np.ones((4, 4)))[:size, :size]
            out[i, :] = 40 + 180 * blocks
    out += rng.normal(0, 20, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def _balanced_labels(n_per_class: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), n_per_class)
    rng.shuffle(labels)
    return labels


def write_cifar10(root: str | Path, n_train_per_class: int = 5, n_test_per_class: int = 2,
                  seed: int = 0, protocol: int = 2) -> Path:
    """Write a tiny CIFAR-10 in torchvision's layout: ``<root>/cifar-10-batches-py/``.

    ``data_batch_1`` … ``data_batch_5`` (the training images dealt round-robin), ``test_batch``
    and ``batches.meta``, as pickled dicts like the official ones.

    Args:
        root: The data folder (``data_dir``).
        n_train_per_class: Training images per class.
        n_test_per_class: Test images per class.
        seed: Seed of the images.
        protocol: Pickle protocol (the official files use 2).

    Returns:
        The ``cifar-10-batches-py`` folder.
    """
    rng = np.random.default_rng(seed)
    train_labels = _balanced_labels(n_train_per_class, 10, rng)
    train = pattern_images(train_labels, 3, 32, rng)
    test_labels = _balanced_labels(n_test_per_class, 10, rng)
    test = pattern_images(test_labels, 3, 32, rng)
    return write_cifar_batches(root, train, train_labels, test, test_labels, protocol)


def write_cifar_batches(root: str | Path, train: np.ndarray, train_labels: np.ndarray,
                        test: np.ndarray, test_labels: np.ndarray, protocol: int = 2) -> Path:
    """Write uint8 images ``(N, 3, 32, 32)`` and labels 0–9 as CIFAR-10's pickled batches.

    Returns:
        The ``<root>/cifar-10-batches-py`` folder.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = np.ascontiguousarray(train, dtype=np.uint8).reshape(len(train_labels), -1)
    for b in range(5):
        part = slice(b, None, 5)
        entry = {"batch_label": f"training batch {b + 1} of 5", "data": train[part],
                 "labels": train_labels[part].tolist(),
                 "filenames": [f"img_{b}_{i}.png" for i in range(len(train_labels[part]))]}
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(entry, protocol=protocol))
    test = np.ascontiguousarray(test, dtype=np.uint8).reshape(len(test_labels), -1)
    entry = {"batch_label": "testing batch 1 of 1", "data": test, "labels": test_labels.tolist(),
             "filenames": [f"test_{i}.png" for i in range(len(test_labels))]}
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=protocol))
    meta = {"num_cases_per_batch": len(train_labels) // 5, "num_vis": 3072,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder


def write_idx(path: str | Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write a uint8 array as an idx file (the MNIST format), optionally gzip-compressed."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_mnist(root: str | Path, n_train_per_class: int = 5, n_test_per_class: int = 2,
                seed: int = 0, compress: bool = False) -> Path:
    """Write a tiny MNIST in torchvision's layout: ``<root>/MNIST/raw/*-idx?-ubyte``.

    Args:
        root: The data folder (``data_dir``).
        n_train_per_class: Training images per class.
        n_test_per_class: Test images per class.
        seed: Seed of the noise.
        compress: Write only the ``.gz`` files (as the official downloads).

    Returns:
        The ``raw`` folder.
    """
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train_per_class), ("t10k", n_test_per_class)):
        labels = _balanced_labels(n, 10, rng)
        images = pattern_images(labels, 1, 28, rng)[:, 0]
        write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8), compress)
    return raw


_POSITIVE = ("great", "wonderful", "moving", "superb", "delightful", "brilliant", "funny",
             "charming", "best", "masterpiece")
_NEGATIVE = ("boring", "awful", "dull", "terrible", "worst", "tedious", "bland", "mess",
             "stupid", "waste")
_NEUTRAL = ("the", "film", "movie", "plot", "actor", "story", "scene", "director", "and", "it",
            "is", "a", "of", "this", "with", "was", "characters", "script", "camera", "ending")


def polarity_texts(label: str, n: int, seed: int = 0, length: int = 12,
                   cue_purity: float = 1.0) -> list[str]:
    """Short review-like texts whose polarity shows in their sentiment words.

    Args:
        label: ``pos`` or ``neg``.
        n: Number of texts.
        seed: Seed.
        length: Words per text.
        cue_purity: Probability that a sentiment word is of the text's polarity (1: every one;
            below 1 the label shows only in which polarity is in the majority, a harder task).

    Returns:
        The texts.
    """
    if not 0.5 <= cue_purity <= 1:
        raise ValueError(f"cue_purity must lie in [0.5, 1], got {cue_purity!r}")
    rng = random.Random(f"{seed}-{label}")
    own, other = (_POSITIVE, _NEGATIVE) if label == "pos" else (_NEGATIVE, _POSITIVE)
    texts = []
    for _ in range(n):
        words = [rng.choice(_NEUTRAL) for _ in range(length)]
        for k in range(3):
            cues = own if cue_purity == 1 or rng.random() < cue_purity else other
            words[rng.randrange(length)] = rng.choice(cues) if k else rng.choice(cues).upper()
        texts.append(" ".join(words) + " .")
    return texts


def write_review_polarity(root: str | Path, n_per_class: int = 10, seed: int = 0,
                          bad_bytes: bool = False, length: int = 12,
                          cue_purity: float = 1.0) -> Path:
    """Write a tiny review polarity v2.0: ``<root>/txt_sentoken/{neg,pos}/cv*.txt``.

    Args:
        root: The data folder (``data_dir``).
        n_per_class: Reviews per label.
        seed: Seed.
        bad_bytes: Put one byte that is not UTF-8 (0xE9, a latin-1 "é") in the first review.
        length: Words per review (:func:`polarity_texts`).
        cue_purity: Share of sentiment words of the review's polarity (:func:`polarity_texts`).

    Returns:
        The ``txt_sentoken`` folder.
    """
    folder = Path(root) / "txt_sentoken"
    for label in ("neg", "pos"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(polarity_texts(label, n_per_class, seed, length, cue_purity)):
            data = text.encode()
            if bad_bytes and i == 0 and label == "neg":
                data = b"caf\xe9 " + data
            (folder / label / f"cv{i:03d}_{1000 + i}.txt").write_bytes(data)
    return folder


def write_sentence_polarity(root: str | Path, n_per_class: int = 10, seed: int = 0) -> Path:
    """Write a tiny sentence polarity v1.0: ``<root>/rt-polaritydata/rt-polarity.{neg,pos}``.

    Args:
        root: The data folder (``data_dir``).
        n_per_class: Sentences per label.
        seed: Seed.

    Returns:
        The ``rt-polaritydata`` folder.
    """
    folder = Path(root) / "rt-polaritydata"
    folder.mkdir(parents=True, exist_ok=True)
    for label in ("neg", "pos"):
        lines = polarity_texts(label, n_per_class, seed)
        (folder / f"rt-polarity.{label}").write_text("\n".join(lines) + "\n")
    return folder
