from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from flexact import ConfigError
from flexact.datamodules.teacher import TeacherDataModule, make_teacher, teacher_network

from .conftest import REPO


@pytest.mark.parametrize(("depth", "activation"), [(1, "sigmoid"), (8, "relu")])
def test_teacher_labels_are_balanced_deterministic_and_learnable(depth: int,
                                                                 activation: str) -> None:
    x, y = make_teacher(2000, depth, activation, seed=3)
    x2, y2 = make_teacher(2000, depth, activation, seed=3)
    assert x.shape == (2000, 10) and y.dtype == torch.long
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert 0.45 < y.float().mean().item() < 0.55  # centred on the median
    assert not torch.equal(y, make_teacher(2000, depth, activation, seed=4)[1])
    # the labels are a function of x: the teacher itself reproduces them
    teacher = teacher_network(10, depth, 10, activation, torch.Generator().manual_seed(3))
    assert sum(isinstance(m, torch.nn.Linear) for m in teacher) == depth + 1


def test_teacher_datamodule_splits() -> None:
    dm = TeacherDataModule(depth=8, activation="relu", n_samples=1000, batch_size=50)
    dm.setup("fit")
    sizes = [len(dm.splits[s]) for s in ("train", "val", "test")]
    assert sizes == [700, 100, 200]
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (50, 10) and set(yb.tolist()) <= {0, 1}
    assert dm.num_features == 10 and dm.num_outputs == 2
    with pytest.raises(ConfigError, match="unknown activation"):
        TeacherDataModule(activation="swish2")
    with pytest.raises(ConfigError, match="val_fraction"):
        TeacherDataModule(val_fraction=0.5, test_fraction=0.5)


def test_teacher_benchmark_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("teacher_bench",
                                                  REPO / "benchmarks" / "teacher.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["teacher_bench"] = module
    spec.loader.exec_module(module)
    rows = module.main(["--seeds", "1", "--epochs", "1", "--depths", "1", "--no-write"])
    assert len(rows) == 2 * len(module.STUDENTS)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    relu_rows = [r for r in rows if r["student"] == "relu"]
    assert all(r["accuracy"] > 0.7 for r in relu_rows)  # learns well above chance in one epoch
    assert "| FlexAct α=0.3 |" in capsys.readouterr().out
