"""The three small tasks of benchmarks/probe.py, and their brief training runs.

- ``teacher_mlp``: binary labels of a random 4-layer ReLU teacher (``make_teacher``), an MLP
  10 → 32 → 32 → 2 with the expression at both hidden layers; 3 000 training and 1 000
  validation examples, 8 epochs of batch 128, Adam 1e-2.
- ``digits_lenet``: scikit-learn's digits written as MNIST idx files (28×28) and read back
  with torchvision's ``MNIST``; LeNet5 (6 and 16 maps, 84 hidden units) with the expression
  at its three sites; 3 epochs of batch 64, Adam 3e-3.
- ``digits_resnet``: the same digits painted in random colours and places on 32×32 colour
  backgrounds, written as CIFAR-10 batches and read back with flexact's reader; a small
  residual CNN (16 → 32 channels, two residual blocks, batch norm) with the expression at its
  five sites; 3 epochs of batch 64, Adam 3e-3.

Each run starts from seed 0 (weights and data order); the metric is validation accuracy.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexact import get_activation
from flexact.backbones import MLP, LeNet5
from flexact.datamodules.cifar10 import read_cifar_batch
from flexact.datamodules.teacher import make_teacher
from flexact.tools.digits import write_digits_cifar, write_digits_mnist

Data = tuple[Tensor, Tensor, Tensor, Tensor]


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, act: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act1, self.act2 = get_activation(act), get_activation(act)
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                   nn.BatchNorm2d(c_out)))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.skip(x))


def small_resnet(act: str, num_classes: int = 10) -> nn.Module:
    """A residual CNN for 32×32 colour images: 16 → 32 channels, two blocks."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                         get_activation(act), _Block(16, 16, 2, act), _Block(16, 32, 2, act),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def _teacher() -> Data:
    x, y = make_teacher(4000, depth=4, activation="relu", seed=0)
    return x[:3000], y[:3000], x[3000:], y[3000:]


def _digits_mnist(root: Path) -> Data:
    from torchvision.datasets import MNIST

    write_digits_mnist(root)
    parts = []
    for train in (True, False):
        ds = MNIST(str(root), train=train)
        parts += [(ds.data.float()[:, None] / 255.0 - 0.1307) / 0.3081, ds.targets]
    return parts[0], parts[1], parts[2], parts[3]


def _digits_cifar(root: Path) -> Data:
    folder = write_digits_cifar(root)
    train = [read_cifar_batch(folder / f"data_batch_{b}") for b in range(1, 6)]
    x_train = torch.cat([x for x, _ in train]).float() / 255.0
    y_train = torch.cat([y for _, y in train])
    x_test, y_test = read_cifar_batch(folder / "test_batch")
    x_test = x_test.float() / 255.0
    mean, std = x_train.mean((0, 2, 3), keepdim=True), x_train.std((0, 2, 3), keepdim=True)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


@dataclass(frozen=True)
class Task:
    """A data set, a model builder, and the brief recipe."""

    name: str
    data: Callable[[Path], Data]
    model: Callable[[str], nn.Module]
    epochs: int
    batch_size: int
    lr: float


TASKS = {
    "teacher_mlp": Task("teacher_mlp", lambda root: _teacher(),
                        lambda act: nn.Sequential(MLP(10, (32, 32), activation=act),
                                                  nn.Linear(32, 2)), 8, 128, 1e-2),
    "digits_lenet": Task("digits_lenet", _digits_mnist,
                         lambda act: nn.Sequential(LeNet5(1, 28, (6, 16), 5, 84, act),
                                                   nn.Linear(84, 10)), 3, 64, 3e-3),
    "digits_resnet": Task("digits_resnet", _digits_cifar, small_resnet, 3, 64, 3e-3),
}

_DATA: dict[str, Data] = {}


def task_data(task: Task) -> Data:
    """The task's tensors, written to disk in their format and read back once per process."""
    if task.name not in _DATA:
        with tempfile.TemporaryDirectory() as root:
            _DATA[task.name] = task.data(Path(root))
    return _DATA[task.name]


def train_once(task: Task, expression: str, epochs: int | None = None) -> dict[str, float]:
    """Train the task's model with ``expression`` at its sites; validation accuracy and cost."""
    x, y, xv, yv = task_data(task)
    torch.manual_seed(0)
    model = task.model(expression)
    opt = torch.optim.Adam(model.parameters(), lr=task.lr)
    order = torch.Generator().manual_seed(0)
    steps, start, failed = 0, time.perf_counter(), False
    for _ in range(task.epochs if epochs is None else epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=order).split(task.batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                failed = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        if failed:
            break
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b) for b in xv.split(512)])
    accuracy = float((logits.argmax(1) == yv).float().mean())
    if failed or not torch.isfinite(logits).all():
        accuracy = float((yv == yv.mode().values).float().mean())  # a diverged run: chance
    return {"accuracy": accuracy, "steps": steps, "seconds": time.perf_counter() - start}
