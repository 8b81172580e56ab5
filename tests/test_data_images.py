from __future__ import annotations

import functools
import gzip
import http.server
import pickle
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchvision

from flexact import ConfigError
from flexact.backbones import LeNet5
from flexact.cli import build_cli, main
from flexact.datamodules import CIFAR10DataModule, DatasetError, MNISTDataModule
from flexact.datamodules._common import file_md5
from flexact.datamodules._images import TensorBatchLoader, random_crop, random_hflip
from flexact.datamodules.sampling import shard_indices
from flexact.modules import FlexActClassifier
from flexact.tools.fake_data import write_cifar10, write_idx, write_mnist

from .conftest import REPO

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# --------------------------------------------------------------------------- a local web server
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, served folder): a web server on 127.0.0.1, stopped after the test."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A URL on a local port where nothing listens (no network, fails at once)."""
    with socket.socket() as s:
        # Bound but not listening for the whole test: a parallel test worker cannot take it.
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}/"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train on one intra-op thread: small models run as fast, and a busy machine (other jobs on
    the cores) cannot stall OpenMP's spinning threads (observed: 1.5 s becoming 60 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tar(source: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return archive


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("flexact: error:")]
    return line


# --------------------------------------------------------------------------- shared arguments
COMMON = ("data_dir", "download", "val_split", "seed", "batch_size", "num_workers", "augment",
          "on_device", "val_shift", "shift_strength")


@pytest.mark.parametrize(("name", "own", "augment"), [
    ("CIFAR10DataModule", ("url", "check_md5"), True),
    ("MNISTDataModule", ("mirrors", "check_md5"), False),
])
def test_image_modules_share_their_arguments_and_the_cli_lists_them_all(
    name: str, own: tuple[str, ...], augment: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--data.help", name])
    out = capsys.readouterr().out
    for argument in (*COMMON, *own):
        assert f"--data.{argument} " in out
    assert "Images per batch" in out and "0 is usually fastest" in out  # the shared docstrings
    assert f"(type: bool, default: {augment})" in out.split("--data.augment", 1)[1]
    dm = {"CIFAR10DataModule": CIFAR10DataModule, "MNISTDataModule": MNISTDataModule}[name]()
    assert set(dm.hparams) == {*COMMON, *own} and dm.hparams.augment is augment
    with pytest.raises(TypeError):
        type(dm)("data")  # keyword-only: a positional value never lands in the wrong argument


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_size": 0}, "batch_size must be a positive int"),
    ({"num_workers": -1}, "num_workers must be >= 0"),
    ({"val_split": 1.0}, "val_split must be a fraction"),
    ({"on_device": "gpu"}, "on_device must be"),
])
def test_bad_image_arguments_are_config_errors(kwargs: dict, message: str) -> None:
    for cls in (CIFAR10DataModule, MNISTDataModule):
        with pytest.raises(ConfigError, match=message):
            cls(**kwargs)


# --------------------------------------------------------------------------- CIFAR-10
@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_reads_the_official_pickles_and_carves_a_seeded_val_split(
    tmp_path: Path, protocol: int
) -> None:
    write_cifar10(tmp_path, n_train_per_class=5, n_test_per_class=2, protocol=protocol)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_split=0.2, seed=3, batch_size=8)
    dm.setup("fit")
    x_train, y_train = dm.splits["train"]
    assert y_train.dtype == torch.int64
    x_val, y_val = dm.splits["val"]
    assert x_train.dtype == torch.uint8 and x_train.shape == (40, 3, 32, 32)
    assert x_val.shape == (10, 3, 32, 32) and y_val.dtype == torch.int64
    assert dm.classes[0] == "airplane" and dm.num_outputs == 10 and dm.num_features is None
    # the same seed carves the same split; another seed another one
    again = CIFAR10DataModule(data_dir=str(tmp_path), val_split=0.2, seed=3)
    again.setup("fit")
    assert torch.equal(again.splits["val"][0], x_val)
    other = CIFAR10DataModule(data_dir=str(tmp_path), val_split=0.2, seed=4)
    other.setup("fit")
    assert not torch.equal(other.splits["val"][1], y_val)
    dm.setup("test")
    assert dm.splits["test"][0].shape == (20, 3, 32, 32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32) and y.shape == (8,)


def test_cifar10_files_match_what_torchvision_reads(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Our reader and torchvision's agree on the same files (so the fake format is genuine)."""
    write_cifar10(tmp_path, n_train_per_class=3, n_test_per_class=1)
    # torchvision checks the official MD5s, which tiny files cannot have
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    reference = torchvision.datasets.CIFAR10(str(tmp_path), train=True)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_split=0.0)
    dm.setup("fit")
    images, labels = dm.splits["train"]
    assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), reference.data)
    assert labels.tolist() == reference.targets
    assert dm.classes == reference.classes
    assert dm.splits["val"] is dm.splits["test"]  # val_split 0 validates on the test set


def test_batch_augmentation_is_a_padded_crop_and_a_flip() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    cropped = random_crop(x, padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(x)):
        windows = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], cropped[i])]
        assert windows, f"image {i} is not a window of its padded original"
        offsets.add(windows[0])
    assert len(offsets) > 5  # offsets vary from image to image
    flipped = random_hflip(x)
    same = [torch.equal(flipped[i], x[i]) for i in range(len(x))]
    mirrored = [torch.equal(flipped[i], x[i].flip(-1)) for i in range(len(x))]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 10 < sum(mirrored) < 54


def test_transform_batch_normalizes_and_augments_only_in_training(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    x = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)
    x[:, :, :, :16] = 0  # left half black: a flip is visible
    evaluated = dm.transform_batch(x, train=False)
    expected = (x.float() / 255 - torch.tensor(dm.mean).view(1, 3, 1, 1)) \
        / torch.tensor(dm.std).view(1, 3, 1, 1)
    assert evaluated.dtype == torch.float32 and torch.allclose(evaluated, expected)
    torch.manual_seed(1)
    trained = torch.stack([dm.transform_batch(x, train=True) for _ in range(8)])
    assert not torch.allclose(trained, expected.expand_as(trained))
    plain = CIFAR10DataModule(data_dir=str(tmp_path), augment=False)
    assert torch.allclose(plain.transform_batch(x, train=True), expected)


def test_on_device_loader_covers_every_sample_and_shards_ranks() -> None:
    data = torch.arange(10)
    loader = TensorBatchLoader((data, data * 2), batch_size=3, shuffle=True, seed=0)
    assert len(loader) == 4
    epoch0 = torch.cat([b[0] for b in loader])
    assert torch.equal(torch.cat([b[0] for b in loader]), epoch0)  # the epoch is set from outside
    loader.set_epoch(1)
    epoch1 = torch.cat([b[0] for b in loader])
    assert sorted(epoch1.tolist()) == list(range(10)) and not torch.equal(epoch0, epoch1)
    assert all(torch.equal(b[1], b[0] * 2) for b in loader)
    ranks = [TensorBatchLoader((data,), 2, shuffle=True, seed=5, rank=r, world_size=3)
             for r in range(3)]
    shards = [torch.cat([b[0] for b in r]).tolist() for r in ranks]
    assert {len(s) for s in shards} == {4} and {len(r) for r in ranks} == {2}
    assert set().union(*map(set, shards)) == set(range(10))


def test_on_device_loader_order_is_set_from_outside_and_resumes_mid_epoch() -> None:
    data = torch.arange(22)

    def loader(rank: int = 0) -> TensorBatchLoader:
        return TensorBatchLoader((data,), 4, shuffle=True, seed=3, rank=rank, world_size=2)

    for rank in (0, 1):
        full = loader(rank)
        full.set_epoch(2)
        order = torch.cat([b[0] for b in full])
        expected = shard_indices(22, rank, 2, seed=3, epoch=2)
        assert torch.equal(order, expected)  # the DistributedSampler rule, whatever came before
        iterator = iter(full)
        seen = [next(iterator)[0] for _ in range(2)]
        state = full.state_dict()
        assert state == {"epoch": 2, "batches": 2}
        resumed = loader(rank)
        resumed.load_state_dict(state)
        assert resumed.epoch == 2 and len(resumed) == 3  # Lightning counts the skipped batches
        rest = [b[0] for b in resumed]
        assert torch.equal(torch.cat(seen + rest), expected) and len(rest) == 1
        assert torch.equal(torch.cat([b[0] for b in resumed]), expected)  # then whole again
    finished = loader()
    finished.load_state_dict({"epoch": 2, "batches": 3})  # a finished epoch: the next one
    assert finished.epoch == 3 and len(list(finished)) == 3


def test_on_device_true_serves_tensor_batches(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_train_per_class=2, n_test_per_class=1)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), on_device=True, batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, TensorBatchLoader)
    x, y = next(iter(loader))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32) and y.shape == (4,)
    auto = CIFAR10DataModule(data_dir=str(tmp_path), on_device="auto")
    auto.setup("fit")
    assert isinstance(auto.train_dataloader(), torch.utils.data.DataLoader)  # CPU: stays a loader


def _fit_and_test(dm: L.LightningDataModule, backbone: torch.nn.Module, epochs: int,
                  root: Path) -> float:
    model = FlexActClassifier(backbone=backbone, num_outputs=10, hidden_features=64,
                              optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    trainer.fit(model, datamodule=dm)
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    return result["test_acc"]


@pytest.mark.usefixtures("one_thread")
def test_learns_ten_visible_patterns_through_the_cifar_loaders(tmp_path: Path) -> None:
    L.seed_everything(0)
    write_cifar10(tmp_path, n_train_per_class=24, n_test_per_class=10, seed=1)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_split=0.1, batch_size=16, on_device=True)
    accuracy = _fit_and_test(dm, LeNet5(in_channels=3, image_size=32, hidden_features=None),
                             epochs=6, root=tmp_path)
    assert accuracy > 0.8  # chance is 0.1


# --------------------------------------------------------------------------- MNIST
@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx_files_plain_or_gzipped(tmp_path: Path, compress: bool) -> None:
    write_mnist(tmp_path, n_train_per_class=4, n_test_per_class=2, compress=compress)
    dm = MNISTDataModule(data_dir=str(tmp_path), val_split=0.25, batch_size=5)
    dm.setup("fit")
    dm.setup("test")
    assert dm.splits["train"][0].shape == (30, 1, 28, 28)
    assert dm.splits["val"][0].shape == (10, 1, 28, 28)
    assert dm.splits["test"][0].dtype == torch.uint8 and len(dm.splits["test"][1]) == 20
    x, _ = next(iter(dm.val_dataloader()))
    assert dm.transform_batch(x, train=True).shape == (5, 1, 28, 28)
    if not compress:  # torchvision reads the same raw files (it checks only their presence)
        reference = torchvision.datasets.MNIST(str(tmp_path), train=False)
        assert torch.equal(reference.data.unsqueeze(1), dm.splits["test"][0])
        assert torch.equal(reference.targets, dm.splits["test"][1])


@pytest.mark.usefixtures("one_thread")
def test_learns_through_the_mnist_loaders_and_the_lenet5_config(tmp_path: Path) -> None:
    write_mnist(tmp_path / "data", n_train_per_class=24, n_test_per_class=10, seed=2)
    common = ["--config", str(REPO / "configs" / "lenet5_mnist.yaml"), *QUIET,
              "--data.data_dir", str(tmp_path / "data"), "--data.download", "false",
              "--data.batch_size", "16", "--trainer.default_root_dir", str(tmp_path / "runs"),
              "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    cli = build_cli(["fit", *common, "--trainer.max_epochs", "4",
                     "--model.init_args.lr_scheduler.init_args.T_max", "4"])
    (result,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert result["test_acc"] > 0.8


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("config", ["resnet18.yaml", "lenet5_mnist.yaml"])
def test_missing_data_without_download_is_one_clear_error(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _cli_error(["fit", "--config", str(REPO / "configs" / config), *QUIET,
                       "--data.data_dir", str(tmp_path), "--data.download", "false",
                       "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert "not found" in line and str(tmp_path) in line and "data.download true" in line


def test_truncated_or_corrupt_cifar_files_are_clear_errors(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path, n_train_per_class=2, n_test_per_class=1)
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DatasetError, match=r"data_batch_3 is truncated or corrupt"):
        dm.setup("fit")
    # a pickle that would run code is refused, not executed
    batch.write_bytes(pickle.dumps({"data": __import__("os").getcwd}))
    with pytest.raises(DatasetError, match=r"unexpected object posix.getcwd"):
        dm.setup("fit")
    batch.write_bytes(pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}))
    with pytest.raises(DatasetError, match=r"data_batch_3 is not a CIFAR batch"):
        dm.setup("fit")
    batch.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 12]}))
    with pytest.raises(DatasetError, match=r"labels outside 0..9"):
        dm.setup("fit")


def test_truncated_or_corrupt_mnist_files_are_clear_errors(tmp_path: Path) -> None:
    raw = write_mnist(tmp_path, n_train_per_class=2, n_test_per_class=1)
    dm = MNISTDataModule(data_dir=str(tmp_path))
    images = raw / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(good[:-100])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte is truncated or corrupt: "
                                           r"the header announces shape \[20, 28, 28\]"):
        dm.setup("fit")
    images.write_bytes(b"\x00\x00\x0d\x03" + good[4:])  # float32 magic: not MNIST
    with pytest.raises(DatasetError, match="not a uint8 idx file"):
        dm.setup("fit")
    images.unlink()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(good)[:-30])
    with pytest.raises(DatasetError, match=r"idx3-ubyte.gz is truncated or corrupt"):
        dm.setup("fit")
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DatasetError, match="do not match"):
        dm.setup("fit")


# --------------------------------------------------------------------------- downloads
def test_cifar10_download_from_a_local_server(
    tmp_path: Path, http_server: tuple[str, Path]
) -> None:
    base, served = http_server
    write_cifar10(tmp_path / "src", n_train_per_class=2, n_test_per_class=1)
    archive = _tar(tmp_path / "src" / "cifar-10-batches-py", served / "cifar-10-python.tar.gz",
                   "cifar-10-batches-py")
    url = base + "cifar-10-python.tar.gz"
    # the official MD5 check rejects the (tiny, different) archive, and leaves nothing behind
    strict = CIFAR10DataModule(data_dir=str(tmp_path / "a"), download=True, url=url)
    with pytest.raises(DatasetError, match=r"has MD5 .* expected c58f30108f718f92721af3b95e74349a"):
        strict.prepare_data()
    assert not (tmp_path / "a").exists()  # nor the folder it would have created
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "b"), download=True, url=url, check_md5=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.splits["train"][0].shape[0] + dm.splits["val"][0].shape[0] == 20
    assert file_md5(tmp_path / "b" / "cifar-10-python.tar.gz") == file_md5(archive)
    archive.unlink()  # present data: no second download
    dm.prepare_data()


def test_mnist_download_tries_mirrors_in_order(
    tmp_path: Path, http_server: tuple[str, Path], dead_url: str
) -> None:
    base, served = http_server
    write_mnist(served, n_train_per_class=2, n_test_per_class=1, compress=True)
    mirror = base + "MNIST/raw/"
    dm = MNISTDataModule(data_dir=str(tmp_path / "d"), download=True,
                         mirrors=[dead_url, mirror], check_md5=False)
    dm.prepare_data()
    raw = tmp_path / "d" / "MNIST" / "raw"
    assert (raw / "t10k-labels-idx1-ubyte").is_file()  # decompressed like torchvision does
    dm.setup("test")
    assert dm.splits["test"][0].shape == (10, 1, 28, 28)
    strict = MNISTDataModule(data_dir=str(tmp_path / "e"), download=True, mirrors=[mirror])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz from any mirror.*MD5"):
        strict.prepare_data()


def test_no_network_is_one_clear_error(
    tmp_path: Path, dead_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _cli_error(["fit", "--config", str(REPO / "configs" / "resnet18.yaml"), *QUIET,
                       "--data.data_dir", str(tmp_path), "--data.download", "true",
                       "--data.url", dead_url + "cifar-10-python.tar.gz",
                       "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert "could not download" in line and dead_url in line and "network" in line
    assert not list(tmp_path.glob("*.part"))
