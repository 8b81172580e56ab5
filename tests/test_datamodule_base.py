"""``SplitDataModule``: every data module serves its splits through the same resumable loaders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flexact.datamodules import CIFAR10DataModule, SyntheticDataModule, TextDataModule
from flexact.datamodules.base import SplitDataModule
from flexact.datamodules.sampling import EpochRandomSampler, ResumableDataLoader, shard_indices
from flexact.datamodules.teacher import TeacherDataModule
from flexact.tools.fake_data import write_cifar10, write_sentence_polarity

Factory = Callable[[Path], SplitDataModule]

MODULES: dict[str, Factory] = {
    "synthetic": lambda _: SyntheticDataModule(n_train=37, n_val=9, n_test=11, batch_size=5),
    "teacher": lambda _: TeacherDataModule(n_samples=60, batch_size=5),
    "text": lambda root: TextDataModule(data_dir=str(write_sentence_polarity(root, 20).parent),
                                        source="sentence_polarity", batch_size=5),
    "images": lambda root: CIFAR10DataModule(data_dir=str(write_cifar10(root, 4, 1).parent),
                                             batch_size=5, on_device=False),
}


@pytest.fixture(params=sorted(MODULES))
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], SplitDataModule]:
    def build() -> SplitDataModule:
        dm = MODULES[request.param](tmp_path)
        dm.setup("fit")
        dm.setup("test")
        return dm

    return build


def _first(batches: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    return [b[0] for b in batches]


def _inputs(dm: SplitDataModule, split: str) -> torch.Tensor:
    data = dm.splits[split]  # image modules keep (images, labels) pairs
    return data.tensors[0] if isinstance(data, TensorDataset) else data[0]


def test_every_module_serves_its_splits_through_the_shared_loaders(
    make: Callable[[], SplitDataModule],
) -> None:
    dm = make()
    assert isinstance(dm, SplitDataModule)
    train = dm.train_dataloader()
    assert isinstance(train, ResumableDataLoader) and isinstance(train.sampler, EpochRandomSampler)
    for loader, split in ((dm.val_dataloader(), "val"), (dm.test_dataloader(), "test"),
                          (dm.predict_dataloader(), "test")):
        assert type(loader) is DataLoader and loader.batch_size == 5
        inputs = torch.cat([b[0] for b in loader])
        assert torch.equal(inputs, _inputs(dm, split))  # in order, whole
    # epoch e's order is a pure function of (seed, e), and the loaders leave the global RNG alone
    train.sampler.set_epoch(3)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    inputs = _inputs(dm, "train")
    order = shard_indices(len(inputs), seed=train.sampler.seed, epoch=3)
    served = torch.cat([b[0] for b in train])
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        list(loader)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(served, inputs[order])


def test_every_training_loader_resumes_mid_epoch(make: Callable[[], SplitDataModule]) -> None:
    loader = make().train_dataloader()
    loader.sampler.set_epoch(1)
    full = _first(list(loader))
    iterator = iter(loader)
    seen = [next(iterator)[0] for _ in range(3)]
    resumed = make().train_dataloader()  # a new process: a new module, from the saved state
    resumed.load_state_dict(loader.state_dict())
    resumed.sampler.set_epoch(1)
    rest = _first(list(resumed))
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, full, strict=True))


def test_loaders_before_setup_name_the_missing_split() -> None:
    dm = TeacherDataModule()
    with pytest.raises(RuntimeError, match=r"TeacherDataModule.setup\(\) has not prepared the "
                                           "train split"):
        dm.train_dataloader()
