"""Reproduce Table 1 of the FlexAct paper (docs/method.md §3.1): synthetic activation recovery.

Five hidden truths × five seeds × seven models (FlexAct α = 0.3, FlexAct α = 0, and the five
fixed activations). Hyperparameters (epochs, learning rate, τ schedule, λ, data sizes, batch
size) are read from ``configs/synthetic.yaml`` so the benchmark and the shipped config agree.

Speed: per truth, all 35 single-layer models train side by side in one LightningModule and one
Trainer (``side_by_side.SideBySide``: disjoint parameters, summed losses, so Adam steps each
model exactly as if it trained alone on the same batches). A fixed activation is a FlexAct head
with one candidate (its selection is constant, its KL zero).

Usage: ``python benchmarks/table1.py [--seeds 5] [--epochs N] [--no-write]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch import nn

from flexact import FlexActHead
from flexact.callbacks import SelectionCommit, TemperatureAnnealing
from flexact.datamodules import SyntheticDataModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # sibling scripts, not a package
from side_by_side import SideBySide

REPO = Path(__file__).resolve().parents[1]
TRUTHS = ["relu", "sigmoid", "tanh", "leaky_relu", "identity"]
MODELS = ["FlexAct α=0.3", "FlexAct α=0", *TRUTHS]
COMMITTED = ["FlexAct α=0.3 + commit", "FlexAct α=0 + commit"]  # with SelectionCommit
PAPER = {  # docs/method.md Table 1: mean MSE per model (row) and truth (column)
    "FlexAct α=0.3": [0.0001, 0.0011, 0.0001, 0.0001, 0.0000],
    "FlexAct α=0": [0.0001, 0.0059, 0.0021, 0.0001, 0.0000],
    "relu": [0.0000, 0.0059, 0.4328, 0.0004, 4.1675],
    "sigmoid": [2.1360, 0.0000, 0.4020, 2.1365, 6.3056],
    "tanh": [2.2941, 0.0141, 0.0000, 2.2909, 4.2737],
    "leaky_relu": [0.0004, 0.0059, 0.4286, 0.0000, 4.0787],
    "identity": [0.5209, 0.0078, 0.0985, 0.5105, 0.0000],
}
EQUIVALENT = {frozenset({"relu", "leaky_relu"})}  # they differ only by slope 0.01 below zero


def load_config() -> dict[str, Any]:
    with open(REPO / "configs" / "synthetic.yaml") as handle:
        return yaml.safe_load(handle)


def model_specs(models: list[str], seeds: int) -> list[dict[str, Any]]:
    specs = []
    for model in models:
        for seed in range(seeds):
            if model.startswith("FlexAct"):
                alpha = 0.3 if "α=0.3" in model else 0.0
                specs.append({"model": model, "candidates": TRUTHS, "alpha": alpha, "seed": seed})
            else:
                specs.append({"model": model, "candidates": [model], "alpha": 0.0, "seed": seed})
    return specs


def _callback_args(config: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((c.get("init_args", {}) for c in config["trainer"]["callbacks"]
                 if c["class_path"].endswith(name)), None)


def run_truth(truth: str, models: list[str], seeds: int, config: dict[str, Any],
              epochs: int | None, commit: bool) -> list[dict]:
    model_args = config["model"]["init_args"]
    data_args = dict(config["data"]["init_args"], truth=truth)
    callbacks: list[L.Callback] = [
        # The config's `temperature:` section (or a TemperatureAnnealing in its callbacks).
        TemperatureAnnealing(**(config.get("temperature")
                                or _callback_args(config, "TemperatureAnnealing") or {}))
    ]
    if commit:
        # The config's commit, without its check or fresh optimizer state: the check compares
        # one model's per-sample errors, and here many models train side by side in one module
        # (Table 1's "+ commit" rows were measured without either).
        args = {**(_callback_args(config, "SelectionCommit") or {}), "verify": False,
                "reset_optimizer": False}
        callbacks.append(SelectionCommit(**args))
    lr = model_args["optimizer"]["init_args"]["lr"]
    L.seed_everything(config.get("seed_everything", 0), verbose=False)
    specs = model_specs(models, seeds)
    data = SyntheticDataModule(**data_args)
    heads = []
    for spec in specs:
        torch.manual_seed(spec["seed"])  # the seed fixes each model's initialization
        heads.append(FlexActHead(data.num_features, 1, candidates=spec["candidates"],
                                 kl_lambda=model_args["flexact"]["kl_lambda"]))
    module = SideBySide(nn.ModuleList(heads), [s["alpha"] for s in specs], task="mse",
                        optimizer=lambda params: torch.optim.Adam(params, lr=lr))
    trainer = L.Trainer(
        max_epochs=epochs or config["trainer"]["max_epochs"], accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(module, data)
    data.setup("test")
    x, y = data.splits["test"].tensors
    module.eval()
    with torch.no_grad():
        mse = (module(x) - y).square().mean(0)
    rows = []
    for j, (spec, head) in enumerate(zip(specs, heads, strict=True)):
        pick = head.flexact.selected()[0] if spec["model"].startswith("FlexAct") else None
        rows.append({"truth": truth, "model": spec["model"], "seed": spec["seed"],
                     "mse": float(mse[j]), "pick": pick})
    return rows


def correct(pick: str, truth: str) -> bool:
    return pick == truth or frozenset({pick, truth}) in EQUIVALENT


def summarize(rows: list[dict]) -> tuple[str, dict[str, Any]]:
    table: dict[str, list[tuple[float, float]]] = {}
    for model in MODELS + COMMITTED:
        table[model] = []
        for truth in TRUTHS:
            values = [r["mse"] for r in rows if r["model"] == model and r["truth"] == truth]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            table[model].append((statistics.fmean(values), std))
    lines = ["| model | " + " | ".join(TRUTHS) + " |", "|---" * (len(TRUTHS) + 1) + "|"]
    for model in MODELS + COMMITTED:
        paper = PAPER.get(model, [float("nan")] * len(TRUTHS))
        cells = [f"{m:.4f} ± {s:.4f}" + ("" if p != p else f" ({p:.4f})")
                 for (m, s), p in zip(table[model], paper, strict=True)]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    fixed = MODELS[2:]
    stats: dict[str, Any] = {"ranks": {}, "correct": {}, "runs": 0}
    for flexact_model in ("FlexAct α=0.3", "FlexAct α=0", *COMMITTED):
        ranks = []
        for t, truth in enumerate(TRUTHS):
            order = sorted([flexact_model, *fixed], key=lambda m: table[m][t][0])
            ranks.append((truth, order.index(flexact_model) + 1))
        stats["ranks"][flexact_model] = ranks
        runs = [r for r in rows if r["model"] == flexact_model]
        stats["correct"][flexact_model] = sum(correct(r["pick"], r["truth"]) for r in runs)
        stats["runs"] = len(runs)
    picks = ["", "Picks (seed 0…n) per truth:", "",
             "| truth | " + " | ".join(["FlexAct α=0.3", "FlexAct α=0", *COMMITTED]) + " |",
             "|---" * 5 + "|"]
    for truth in TRUTHS:
        cells = [", ".join(r["pick"] for r in rows if r["model"] == m and r["truth"] == truth)
                 for m in ("FlexAct α=0.3", "FlexAct α=0", *COMMITTED)]
        picks.append(f"| {truth} | " + " | ".join(cells) + " |")
    summary = [""]
    for model, ranks in stats["ranks"].items():
        summary.append(
            f"- {model}: picked the truth in {stats['correct'][model]}/{stats['runs']} runs; "
            "rank by mean MSE among itself and the five fixed activations: "
            + ", ".join(f"{t} {r}" for t, r in ranks) + "."
        )
    summary.append("- ReLU and LeakyReLU count as each other for picks.")
    return "\n".join(lines + summary + picks), stats


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds per model and truth")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override max_epochs of configs/synthetic.yaml")
    parser.add_argument("--truths", nargs="+", default=TRUTHS, choices=TRUTHS)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    config = load_config()
    start = time.perf_counter()
    rows: list[dict] = []
    for truth in args.truths:
        t0 = time.perf_counter()
        rows.extend(run_truth(truth, MODELS, args.seeds, config, args.epochs, commit=False))
        rows.extend(run_truth(truth, COMMITTED, args.seeds, config, args.epochs, commit=True))
        print(f"[{truth}] trained {len(MODELS + COMMITTED) * args.seeds} models in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    seconds = time.perf_counter() - start
    if args.truths != TRUTHS:
        for r in rows:
            print(r)
        return {}
    text, stats = summarize(rows)
    print(text)
    print(f"total {seconds:.0f} s")
    if not args.no_write:
        write_section(
            "table1", "Table 1: synthetic recovery (docs/method.md §3.1)", seconds,
            "Cells: mean ± std of test MSE over seeds (the paper's mean in parentheses); FlexAct "
            "is evaluated in eval mode, i.e. with exactly its picked activation.\n\n" + text,
        )
    return stats


if __name__ == "__main__":
    main()
