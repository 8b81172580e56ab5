"""Fixed, adaptive and FlexAct students on teacher-network data (docs/method.md §4, issue 7).

Data: ``TeacherDataModule`` — random teachers with 1 or 8 hidden layers of 10 units, sigmoid or
ReLU, 10 features, 10 000 binary examples. Students copy the teacher's shape (depth, width 10)
and differ in their hidden activation: fixed ReLU / Sigmoid, the adaptive activations of
Farhadi et al. (per-unit α), FlexAct at every hidden layer (α = 0.3 and α = 0), and the
noise-free softmax blend of Manessi & Rozza. "mean KL" is FlexAct with ``kl_reduction="mean"``
(the layers' KL terms averaged instead of summed). All students of one data set train side by side
in one Trainer (see ``side_by_side.py``); the table reports test accuracy, mean ± std over seeds,
and the FlexAct picks per layer.

Usage: ``python benchmarks/teacher.py [--seeds 3] [--epochs 20] [--no-write]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from flexact import FlexAct, flexact_layers, get_activation
from flexact.callbacks import TemperatureAnnealing
from flexact.datamodules.teacher import TeacherDataModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from results import write_section  # sibling scripts, not a package
from side_by_side import SideBySide

REPO = Path(__file__).resolve().parents[1]
STUDENTS = {  # name: (activation factory for a width-10 layer, α of the selection KL)
    "relu": (lambda: get_activation("relu"), 0.0),
    "sigmoid": (lambda: get_activation("sigmoid"), 0.0),
    "adaptive_gumbel": (lambda: get_activation("adaptive_gumbel", num_parameters=10), 0.0),
    "adaptive_relu": (lambda: get_activation("adaptive_relu", num_parameters=10), 0.0),
    "FlexAct α=0.3": (lambda: FlexAct(kl_lambda=0.3), 0.3),
    "FlexAct α=0.3, mean KL": (lambda: FlexAct(kl_lambda=0.3), 0.3),
    "FlexAct α=0": (lambda: FlexAct(), 0.0),
    "blend (Manessi)": (lambda: FlexAct(mode="blend", eval_mode="expected"), 0.0),
}
DATASETS = [(1, "sigmoid"), (1, "relu"), (8, "sigmoid"), (8, "relu")]


def student(depth: int, make_activation: Any, n_features: int = 10, width: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    sizes = [n_features] + [width] * depth
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), make_activation()]
    return nn.Sequential(*layers, nn.Linear(width, 2))


def run_dataset(depth: int, teacher: str, seeds: int, epochs: int) -> list[dict[str, Any]]:
    L.seed_everything(0, verbose=False)
    data = TeacherDataModule(depth=depth, activation=teacher, seed=depth * 10 + len(teacher))
    names, members, alphas = [], [], []
    for name, (factory, alpha) in STUDENTS.items():
        for seed in range(seeds):
            torch.manual_seed(seed)
            names.append((name, seed))
            members.append(student(depth, factory))
            # "mean KL" averages the layers' KL terms (kl_reduction="mean"): α / depth here
            alphas.append(alpha / depth if "mean KL" in name else alpha)
    module = SideBySide(nn.ModuleList(members), alphas, task="ce", flexact={"kl_lambda": 0.3},
                        optimizer=lambda params: torch.optim.Adam(params, lr=0.01))
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[TemperatureAnnealing(start=1.0, end=0.2)],
    )
    trainer.fit(module, data)
    data.setup("test")
    x, y = data.splits["test"].tensors
    module.eval()
    with torch.no_grad():
        accuracy = (module(x).argmax(-1) == y[:, None]).float().mean(0)
    rows = []
    for j, ((name, seed), member) in enumerate(zip(names, members, strict=True)):
        picks = [layer.selected()[0] for _, layer in flexact_layers(member)]
        rows.append({"data": f"depth {depth}, {teacher}", "student": name, "seed": seed,
                     "accuracy": float(accuracy[j]), "picks": picks,
                     "nonfinite": not all(torch.isfinite(p).all() for p in member.parameters())})
    return rows


def summarize(rows: list[dict[str, Any]]) -> str:
    datasets = list(dict.fromkeys(r["data"] for r in rows))
    lines = ["| student | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
    for name in STUDENTS:
        cells = []
        for data in datasets:
            values = [r["accuracy"] for r in rows if r["student"] == name and r["data"] == data]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "FlexAct picks (most common per layer, over seeds):", ""]
    for name in ("FlexAct α=0.3", "FlexAct α=0.3, mean KL", "FlexAct α=0"):
        for data in datasets:
            runs = [r["picks"] for r in rows if r["student"] == name and r["data"] == data]
            per_layer = [Counter(picks).most_common(1)[0][0] for picks in zip(*runs, strict=True)]
            lines.append(f"- {name}, {data}: {', '.join(per_layer)}")
    bad = sum(r["nonfinite"] for r in rows)
    lines.append(f"\nNon-finite parameters after training: {bad} of {len(rows)} students.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per student")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 8], choices=[1, 8])
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for depth, teacher in DATASETS:
        if depth not in args.depths:
            continue
        t0 = time.perf_counter()
        rows.extend(run_dataset(depth, teacher, args.seeds, args.epochs))
        print(f"[depth {depth}, {teacher}] {len(STUDENTS) * args.seeds} students in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    text = summarize(rows)
    print(text)
    print(f"total {seconds:.0f} s")
    if not args.no_write:
        write_section(
            "teacher", "Teacher networks: fixed, adaptive and FlexAct students", seconds,
            "Test accuracy in % (mean ± std over seeds); 8 000 train / 1 000 val / 2 000 test "
            "examples, Adam lr 0.01, batch 128, τ annealed 1 → 0.2 per step.\n\n" + text,
        )
    return rows


if __name__ == "__main__":
    main()
