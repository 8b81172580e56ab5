"""One training epoch through ``flexact fit --config configs/resnet18.yaml`` vs a hand loop.

Both run in this process on the same CIFAR-format data written for the benchmark, with the same
model (CIFAR ResNet18 + FlexAct head, built by the config), batch size, precision and
augmentation (the data module's own batch transform). The hand loop is what a user would write
in plain PyTorch: iterate over the uint8 tensors, transform, forward, loss + α·KL, backward,
SGD step. Epoch times are measured from the first to the last training batch (start-up
excluded) and repeated, interleaved; the ratio of medians is printed.

On the CPU the defaults are small (512 images, batch 32, float32); on a GPU: 10 000 images,
batch 128, bf16 autocast, data on the device — where per-step overheads matter most.

Usage: ``python benchmarks/pipeline.py [--images N] [--batch B] [--repeats R] [--no-write]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from flexact import selection_kl
from flexact.cli import FlexActCLI
from flexact.modules import FlexActModule
from flexact.tools.fake_data import write_cifar10

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # a sibling script, not a package

REPO = Path(__file__).resolve().parents[1]


class EpochTimer(L.Callback):
    """Seconds from the first training batch's start to the last one's end."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def cli_epoch(data_dir: str, batch: int, precision: str, root: str) -> tuple[float, Any]:
    """One epoch of ``configs/resnet18.yaml`` as the CLI builds it; (seconds, the CLI)."""
    cli = FlexActCLI(
        FlexActModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        auto_configure_optimizers=False, run=False, save_config_callback=None, args=[
            "--config", str(REPO / "configs" / "resnet18.yaml"),
            "--data.data_dir", data_dir, "--data.download", "false",
            "--data.batch_size", str(batch), "--trainer.max_epochs", "1",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.precision", precision, "--trainer.default_root_dir", root,
        ])
    timer = EpochTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.seconds, cli


def hand_epoch(cli: Any, batch: int, precision: str) -> float:
    """The same epoch written by hand: same model copy, data, transform, loss and optimizer."""
    datamodule, module = cli.datamodule, cli.model
    device = module.device
    model = torch.nn.Sequential(module.backbone, module.head).to(device).train()
    images, labels = datamodule.splits["train"]
    images, labels = images.to(device), labels.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    alpha = module.hparams.alpha
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else nullcontext())
    order = torch.randperm(len(labels), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(labels), batch):
        index = order[i:i + batch]
        x = datamodule.transform_batch(images[index], train=True)
        if module.hparams.channels_last:  # as the module's forward does
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = F.cross_entropy(model(x), labels[index]) + alpha * selection_kl(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--images", type=int, default=10000 if gpu else 512,
                        help="training images written for the benchmark")
    parser.add_argument("--batch", type=int, default=128 if gpu else 32, help="batch size")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved epochs of each")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    precision = "bf16-mixed" if gpu else "32-true"
    start = time.perf_counter()
    cli_times, hand_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar10(tmp, n_train_per_class=max(args.images // 10, 1), n_test_per_class=1)
        for _ in range(args.repeats):
            seconds, cli = cli_epoch(tmp, args.batch, precision, tmp)
            cli_times.append(seconds)
            hand_times.append(hand_epoch(cli, args.batch, precision))
    result = {"cli_s": statistics.median(cli_times), "hand_s": statistics.median(hand_times)}
    result["ratio"] = result["cli_s"] / result["hand_s"]
    text = ("| images | batch | precision | flexact fit epoch (s) | hand loop epoch (s) | ratio |\n"
            f"|---|---|---|---|---|---|\n| {args.images} | {args.batch} | {precision} | "
            f"{result['cli_s']:.2f} | {result['hand_s']:.2f} | **{result['ratio']:.3f}** |")
    print(text)
    if not args.no_write:
        device = "gpu" if gpu else "cpu"
        write_section(
            f"pipeline-{device}", f"`flexact fit` epoch vs a hand-written loop ({device})",
            time.perf_counter() - start,
            f"Medians of {args.repeats} interleaved epochs (start-up excluded); configs/"
            f"resnet18.yaml on CIFAR-format data written for the run. Goal (issue 8): ≤ 1.10×."
            f"\n\n{text}",
        )
    return result


if __name__ == "__main__":
    main()
