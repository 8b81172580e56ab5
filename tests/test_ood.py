"""Out-of-distribution splits: ``ood_region`` (synthetic, teacher) and ``val_shift`` (images)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from flexact import ConfigError
from flexact.cli import build_cli
from flexact.datamodules import CIFAR10DataModule, MNISTDataModule, SyntheticDataModule
from flexact.datamodules._images import ImageDataModule
from flexact.datamodules.synthetic import informative_signal
from flexact.datamodules.teacher import TeacherDataModule, input_radius, teacher_rule
from flexact.tools.fake_data import write_cifar10, write_mnist

from .conftest import REPO

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SPLITS = ("train", "val", "test")


def _radius(dm: SyntheticDataModule | TeacherDataModule, split: str) -> torch.Tensor:
    x = dm.splits[split].tensors[0]
    if isinstance(dm, TeacherDataModule):
        return input_radius(x).double()
    return informative_signal(x, dm.hparams.n_informative)[:, 0].abs().double()


def _check_regions(dm: SyntheticDataModule | TeacherDataModule, a: float, b: float) -> None:
    for split in ("train", "test"):
        r = _radius(dm, split)
        assert (r <= a).all(), f"{split}: max r {r.max().item()} > {a}"
    r = _radius(dm, "val")
    assert (r > a).all() and (r <= b).all(), f"val: r in [{r.min().item()}, {r.max().item()}]"


# --------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize(("n_informative", "region"), [(1, (1.0, 3.0)), (3, (0.5, 1.5)),
                                                       (2, (3.0, 4.0))])
def test_synthetic_splits_lie_in_their_regions(n_informative: int,
                                               region: tuple[float, float]) -> None:
    dm = SyntheticDataModule(n_features=5, n_informative=n_informative, n_train=3000, n_val=2000,
                             n_test=1000, ood_region=region, seed=1)
    dm.setup("fit")
    assert [len(dm.splits[s]) for s in SPLITS] == [3000, 2000, 1000]
    _check_regions(dm, *region)
    # the target follows the signal: y = relu(5·z)
    x, y = dm.splits["val"].tensors
    torch.testing.assert_close(y, torch.relu(5.0 * informative_signal(x, n_informative)))
    # the regions are filled, not just bounded: both signs and the whole range of |z|
    z = informative_signal(x, n_informative)[:, 0]
    assert (z > 0).any() and (z < 0).any()
    a, b = region
    assert z.abs().min() < a + 0.1 * (b - a) and z.abs().max() > b - 0.1 * (b - a)
    # the non-informative features stay N(0, 1)
    rest = x[:, n_informative:]
    assert abs(rest.mean().item()) < 0.1 and abs(rest.std().item() - 1) < 0.1


def test_synthetic_region_draws_the_conditioned_gaussian() -> None:
    dm = SyntheticDataModule(n_features=4, n_informative=2, n_train=20000, n_val=20000,
                             n_test=10, ood_region=(1.0, 3.0))
    dm.setup("fit")
    reference = torch.randn(400000, generator=torch.Generator().manual_seed(5)).abs()
    for split, keep in (("train", reference <= 1), ("val", (reference > 1) & (reference <= 3))):
        z = _radius(dm, split)
        assert abs(z.mean().item() - reference[keep].mean().item()) < 0.02


def test_synthetic_ood_region_is_deterministic_in_the_seed() -> None:
    def splits(seed: int) -> list[torch.Tensor]:
        dm = SyntheticDataModule(n_train=200, n_val=100, n_test=50, ood_region=(1.0, 3.0),
                                 seed=seed)
        dm.setup("fit")
        return [dm.splits[s].tensors[0] for s in SPLITS]

    first, again, other = splits(7), splits(7), splits(8)
    assert all(torch.equal(u, v) for u, v in zip(first, again, strict=True))
    assert all(not torch.equal(u, v) for u, v in zip(first, other, strict=True))


def test_ood_threshold_still_works_and_defaults_are_unchanged() -> None:
    dm = SyntheticDataModule(n_train=300, n_val=100, n_test=100, ood_threshold=0.5)
    dm.setup("fit")
    assert dm.splits["val"].tensors[0][:, 0].max() <= 0.5
    assert dm.splits["test"].tensors[0][:, 0].min() > 0.5
    plain, again = SyntheticDataModule(n_train=50), SyntheticDataModule(n_train=50, ood_region=None)
    plain.setup("fit")
    again.setup("fit")
    assert torch.equal(plain.splits["val"].tensors[0], again.splits["val"].tensors[0])
    assert _radius(plain, "val").max() > 1  # without a region the splits are not bounded


@pytest.mark.parametrize("cls", [SyntheticDataModule, TeacherDataModule])
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ood_region": (3.0, 1.0)}, "0 < a < b"),
    ({"ood_region": (2.0, 2.0)}, "0 < a < b"),
    ({"ood_region": (0.0, 1.0)}, "0 < a < b"),
    ({"ood_region": (-1.0, 1.0)}, "0 < a < b"),
    ({"ood_region": (1.0, math.inf)}, "finite"),
    ({"ood_region": (1.0, 2.0, 3.0)}, "pair of numbers"),
    ({"ood_region": "1,3"}, "pair of numbers"),
])
def test_bad_ood_region_is_a_config_error(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cls(**kwargs)


def test_ood_region_and_ood_threshold_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="set only one"):
        SyntheticDataModule(ood_threshold=0.5, ood_region=(1.0, 3.0))


def test_expression_truth_and_teacher_activation() -> None:
    expr = "add(sin(x),mul(0.5,x))"
    dm = SyntheticDataModule(truth=expr, k=2.0, n_train=100, n_val=50, n_test=20,
                             ood_region=(1.0, 3.0))
    dm.setup("fit")
    for split in SPLITS:
        x, y = dm.splits[split].tensors
        kz = 2.0 * x[:, :1]
        torch.testing.assert_close(y, torch.sin(kz) + 0.5 * kz)
    teacher = TeacherDataModule(activation=expr, n_samples=500, ood_region=(1.0, 3.0))
    teacher.setup("fit")
    assert set(teacher.splits["val"].tensors[1].tolist()) == {0, 1}


# --------------------------------------------------------------------------- teacher
def test_teacher_splits_lie_in_their_shells_and_are_fast() -> None:
    start = time.process_time()  # CPU time: a parallel test worker does not count
    dm = TeacherDataModule(n_features=10, n_samples=10000, ood_region=(1.0, 3.0))
    dm.setup("fit")
    assert time.process_time() - start < 1.0
    assert [len(dm.splits[s]) for s in SPLITS] == [7000, 1000, 2000]  # as without a region
    _check_regions(dm, 1.0, 3.0)
    far = TeacherDataModule(n_features=100, n_samples=1000, ood_region=(1.3, 1.4))
    far.setup("fit")  # a shell with P ≈ 1e-6 under N(0, I): drawn exactly, not by rejection
    _check_regions(far, 1.3, 1.4)


def test_teacher_labels_come_from_one_rule_in_both_regions() -> None:
    kwargs = {"depth": 1, "activation": "sigmoid", "n_features": 10, "width": 10, "seed": 4}
    dm = TeacherDataModule(n_samples=4000, ood_region=(1.0, 3.0), **kwargs)
    dm.setup("fit")
    rule, reference, _ = teacher_rule(4000, **kwargs)
    for split in SPLITS:
        x, y = dm.splits[split].tensors
        assert torch.equal(y, rule.labels(x)), split  # the same teacher, the same threshold
        assert 0.2 < y.float().mean().item() < 0.8, split  # both classes, not degenerate
    # the rule is that of the data without ood_region: its threshold is the reference median
    plain = TeacherDataModule(n_samples=4000, **kwargs)
    plain.setup("fit")
    x, y = plain.splits["train"].tensors
    assert torch.equal(y, rule.labels(x))
    assert abs(rule.labels(reference).float().mean().item() - 0.5) < 0.01
    # an input gets the same label whichever split it came from
    val_x = dm.splits["val"].tensors[0][:5]
    mixed = torch.cat([dm.splits["train"].tensors[0][:5], val_x])
    assert torch.equal(rule.labels(mixed)[5:], dm.splits["val"].tensors[1][:5])


def test_teacher_ood_region_is_deterministic_in_the_seed() -> None:
    def splits(seed: int, sample_labels: bool) -> list[torch.Tensor]:
        dm = TeacherDataModule(n_samples=600, ood_region=(1.0, 2.0), seed=seed,
                               sample_labels=sample_labels)
        dm.setup("fit")
        return [t for s in SPLITS for t in dm.splits[s].tensors]

    for sample_labels in (False, True):
        first, again = splits(2, sample_labels), splits(2, sample_labels)
        assert all(torch.equal(u, v) for u, v in zip(first, again, strict=True))
        other = splits(3, sample_labels)
        assert not torch.equal(first[0], other[0]) and not torch.equal(first[2], other[2])


# --------------------------------------------------------------------------- images
def _image_module(kind: str, root: Path, **kwargs: object) -> ImageDataModule:
    if kind == "mnist":
        if not (root / "MNIST").exists():
            write_mnist(root, n_train_per_class=4, n_test_per_class=2)
        return MNISTDataModule(data_dir=str(root), download=False, seed=1, **kwargs)
    if not (root / "cifar-10-batches-py").exists():
        write_cifar10(root, n_train_per_class=4, n_test_per_class=2)
    return CIFAR10DataModule(data_dir=str(root), download=False, seed=1, **kwargs)


@pytest.mark.parametrize("kind", ["mnist", "cifar10"])
@pytest.mark.parametrize("val_split", [0.25, 0.0])
@pytest.mark.parametrize("shift", ["brightness", "contrast", "invert"])
def test_val_shift_transforms_only_the_validation_images(kind: str, val_split: float,
                                                         shift: str, tmp_path: Path) -> None:
    plain = _image_module(kind, tmp_path, val_split=val_split)
    shifted = _image_module(kind, tmp_path, val_split=val_split, val_shift=shift,
                            shift_strength=0.5)
    for dm in (plain, shifted):
        dm.setup("fit")
        dm.setup("test")  # a second setup keeps the shift (val may come from the test set)
    for split in ("train", "test"):
        assert torch.equal(plain.splits[split][0], shifted.splits[split][0]), split
    before, after = plain.splits["val"][0], shifted.splits["val"][0]
    assert after.dtype == torch.uint8 and after.shape == before.shape
    assert torch.equal(plain.splits["val"][1], shifted.splits["val"][1])
    if val_split == 0:  # validation is the test set, shifted in a copy
        assert torch.equal(before, plain.splits["test"][0])
        assert not torch.equal(after, shifted.splits["test"][0])
    b, a = before.float(), after.float()
    if shift == "brightness":
        assert a.mean() > b.mean() + 50
        torch.testing.assert_close(a, (b + 127.5).round().clamp(0, 255))
    elif shift == "contrast":
        per_image = (1, 2, 3)
        assert (a.std(dim=per_image) < b.std(dim=per_image)).all()
        assert (a.mean(dim=per_image) - b.mean(dim=per_image)).abs().max() < 1
    else:
        assert torch.equal(after, 255 - before)
    batch = next(iter(shifted.val_dataloader()))
    normalized = shifted.transform_batch(batch[0], train=False)
    assert torch.isfinite(normalized).all()  # normalized after the shift, as any batch


def test_shift_strength_edges(tmp_path: Path) -> None:
    def val(**kwargs: object) -> torch.Tensor:
        dm = _image_module("mnist", tmp_path, val_split=0.25, **kwargs)
        dm.setup("fit")
        return dm.splits["val"][0]

    base = val()
    assert torch.equal(val(val_shift="invert", shift_strength=0.4), base)  # below 0.5: no flip
    assert torch.equal(val(val_shift="brightness", shift_strength=0.0), base)
    assert (val(val_shift="brightness", shift_strength=1.0) == 255).all()
    flat = val(val_shift="contrast", shift_strength=1.0).float()
    assert (flat.std(dim=(1, 2, 3)) == 0).all()  # every image becomes its mean


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"val_shift": "blur"}, "val_shift must be"),
    ({"val_shift": "contrast", "shift_strength": 1.5},
     r"shift_strength must be a number in \[0, 1\]"),
    ({"shift_strength": -0.1}, "shift_strength"),
    ({"shift_strength": True}, "shift_strength"),
])
def test_bad_shift_arguments(kwargs: dict, message: str) -> None:
    for cls in (MNISTDataModule, CIFAR10DataModule):
        with pytest.raises(ConfigError, match=message):
            cls(**kwargs)


# --------------------------------------------------------------------------- end to end
def test_fit_with_ood_region_logs_val_loss(tmp_path: Path) -> None:
    cli = build_cli(["fit", "--config", str(REPO / "configs" / "synthetic.yaml"),
                     "--data.ood_region", "[1.0, 3.0]", "--data.n_train", "256",
                     "--data.n_val", "64", "--data.n_test", "64", "--trainer.max_epochs", "1",
                     "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.logger.init_args.save_dir", str(tmp_path), *QUIET])
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 1
    assert "val_loss" in cli.trainer.callback_metrics
    assert math.isfinite(float(cli.trainer.callback_metrics["val_loss"]))
    assert tuple(cli.datamodule.hparams.ood_region) == (1.0, 3.0)
    _check_regions(cli.datamodule, 1.0, 3.0)
