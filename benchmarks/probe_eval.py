"""The evaluation phase of benchmarks/probe.py: features, surrogates, held-out metrics.

For each task, every cached expression gets its features (outputs on N(0, 1); the K-FAC
Fisher spectrum of the task's model at initialization on the first 128 training examples).
Over repeated random splits (80 % measured, 20 % held out) each ranking method predicts the
held-out accuracies; reported are the mean Spearman ρ over splits and the top-10 % recall (the
share of splits in which the held-out measured best is among the method's top 10 % of the held
out). Methods: a random ranking; 3-NN on the output features alone; on the Fisher features
alone; on both after UMAP (the paper's); on both (flexact's default); on both after PCA.
It also writes flexact/probe/reference.json: per expression, its mean accuracy quantile over
the tasks, which ``flexact probe`` uses before a task has measurements of its own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from probe_tasks import TASKS, task_data
from scipy.stats import spearmanr

from flexact import get_activation
from flexact.probe.fisher import fisher_features, output_distribution
from flexact.probe.surrogate import predict, standardize_blocks

REFERENCE = Path(__file__).resolve().parents[1] / "flexact" / "probe" / "reference.json"
METHODS = ("random", "output only", "fisher only", "both, UMAP (the paper's)",
           "both, no UMAP (default)", "both, PCA")


def features(task_name: str, names: list[str]) -> tuple[np.ndarray, np.ndarray, float]:
    task = TASKS[task_name]
    x, y, _, _ = task_data(task)
    xb, yb = x[:128], y[:128]
    start = time.perf_counter()
    outs, fims = [], []
    for name in names:
        outs.append(output_distribution(get_activation(name)).numpy())
        torch.manual_seed(0)
        model = task.model(name).train()
        fims.append(fisher_features(model, xb, yb, F.cross_entropy).numpy())
    return np.stack(outs), np.stack(fims), (time.perf_counter() - start) / len(names)


def _method_features(method: str, outs: np.ndarray, fims: np.ndarray) -> np.ndarray:
    if method == "output only":
        return standardize_blocks([outs])
    if method == "fisher only":
        return standardize_blocks([fims])
    return standardize_blocks([outs, fims])


def score_methods(outs: np.ndarray, fims: np.ndarray, acc: np.ndarray, splits: int,
                  seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Per method: mean ρ, its spread (std over splits), top-10 % recall."""
    rng = np.random.default_rng(seed)
    n = len(acc)
    results: dict[str, list[tuple[float, bool]]] = {m: [] for m in METHODS}
    for split in range(splits):
        order = rng.permutation(n)
        held, known = order[: max(n // 5, 2)], order[max(n // 5, 2):]
        top = max(1, round(0.1 * len(held)))
        best = held[np.argmax(acc[held])]
        for method in METHODS:
            if method == "random":
                pred = rng.random(n)
            else:
                embedding = {"both, UMAP (the paper's)": "umap", "both, PCA": "pca"}.get(
                    method, "none")
                pred = predict(_method_features(method, outs, fims), known, acc[known],
                               embedding=embedding, seed=split)
            rho = spearmanr(pred[held], acc[held]).statistic
            chosen = held[np.argsort(-pred[held], kind="stable")[:top]]
            results[method].append((0.0 if np.isnan(rho) else float(rho), best in chosen))
    return {m: (float(np.mean([r for r, _ in v])), float(np.std([r for r, _ in v])),
                float(np.mean([h for _, h in v]))) for m, v in results.items()}


def write_reference(cache: dict, tasks: list[str]) -> None:
    """Mean accuracy quantile per expression over the tasks (for flexact probe)."""
    quantiles: dict[str, list[float]] = {}
    for task in tasks:
        names = sorted(cache[task])
        acc = np.array([cache[task][e]["accuracy"] for e in names])
        ranks = acc.argsort().argsort() / max(len(acc) - 1, 1)
        for name, q in zip(names, ranks, strict=True):
            quantiles.setdefault(name, []).append(float(q))
    scores = {e: round(float(np.mean(q)), 4) for e, q in sorted(quantiles.items())
              if len(q) == len(tasks)}
    REFERENCE.write_text(json.dumps({"about": "mean accuracy quantile over the tasks of "
                                     f"benchmarks/probe.py ({', '.join(tasks)})",
                                     "scores": scores}, indent=1))


def evaluate(cache: dict, tasks: list[str], splits: int = 30, reference: bool = True) -> dict:
    """Print the table (Markdown); return the numbers."""
    table = {}
    print("| task | expressions | s / candidate (features) | method | Spearman ρ (± over "
          "splits) | top-10 % recall |")
    print("|---|---|---|---|---|---|")
    for task in tasks:
        names = sorted(cache.get(task, {}))
        if len(names) < 5:
            continue
        acc = np.array([cache[task][e]["accuracy"] for e in names])
        outs, fims, per = features(task, names)
        scores = score_methods(outs, fims, acc, splits)
        table[task] = scores
        for method, (rho, spread, recall) in scores.items():
            print(f"| {task} | {len(names)} | {per:.2f} | {method} | {rho:.2f} ± {spread:.2f} "
                  f"| {recall:.0%} |")
    if reference and len(table) == len(TASKS):
        write_reference(cache, list(table))
        print(f"wrote {REFERENCE}")
    return table
