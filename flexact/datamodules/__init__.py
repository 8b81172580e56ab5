"""Lightning data modules: the synthetic task, MNIST, CIFAR-10 and text classification.

Real-data modules download only in ``prepare_data`` and build their data sets in ``setup``;
any missing, truncated or corrupt file, or a failed download, raises :class:`DatasetError` (a
:class:`~flexact.ConfigError`) naming the path and what to do. :mod:`flexact.tools.fake_data`
writes tiny data sets in the genuine on-disk formats, for smoke tests without downloading.
"""

from flexact.datamodules._common import DatasetError
from flexact.datamodules._images import ImageDataModule
from flexact.datamodules.base import SplitDataModule
from flexact.datamodules.cifar10 import CIFAR10DataModule
from flexact.datamodules.mnist import MNISTDataModule
from flexact.datamodules.synthetic import SyntheticDataModule, make_synthetic
from flexact.datamodules.teacher import TeacherDataModule, make_teacher
from flexact.datamodules.text import TextDataModule, Vocabulary, load_vectors, tokenize

__all__ = [
    "CIFAR10DataModule",
    "DatasetError",
    "ImageDataModule",
    "MNISTDataModule",
    "SplitDataModule",
    "SyntheticDataModule",
    "TeacherDataModule",
    "TextDataModule",
    "Vocabulary",
    "load_vectors",
    "make_synthetic",
    "make_teacher",
    "tokenize",
]
