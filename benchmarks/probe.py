"""Does the training-free probe predict how well an activation trains? (issue: flexact probe)

A few hundred expressions drawn from the schemas (every one-operator function, and draws from
``unary(unary(x))`` and ``binary(unary(x),unary(x))``) are each trained briefly on three small
tasks with different architectures (benchmarks/probe_tasks.py: an MLP on teacher data, LeNet5
on MNIST-format digits, a residual CNN on CIFAR-format digits). The measured accuracies are
cached in ``benchmarks/probe_cache.json`` (kept with the benchmark: a rerun trains only what is
missing). Then, per task, the probe's features (the activation's outputs on N(0, 1) and the
K-FAC Fisher spectrum of that task's model at initialization) feed the surrogate, evaluated on
held-out expressions over repeated random splits: Spearman ρ between predicted and measured
accuracy, and top-10 % recall (is the held-out measured best among the surrogate's top 10 %?),
against a random ranking and the output-distribution feature alone.

Usage::

    python benchmarks/probe.py train            # fill the cache (about 30 min, 1 thread)
    python benchmarks/probe.py evaluate         # the table (about 2 min)
    python benchmarks/probe.py smoke            # a tiny end-to-end run (the test suite's)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_tasks import TASKS, train_once

from flexact.nn.canonical import expand_schema

CACHE = Path(__file__).resolve().parent / "probe_cache.json"


def expressions(n_unary_unary: int = 80, n_binary: int = 200) -> list[str]:
    """The benchmark's expressions: distinct functions, in a fixed order."""
    chosen = expand_schema("unary")
    chosen += expand_schema("unary_unary", limit=n_unary_unary, seed=0)
    chosen += expand_schema("binary_unary", limit=n_binary, seed=0)
    return list(dict.fromkeys(chosen))


def load_cache(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    return json.loads(path.read_text()) if path.exists() else {}


def save_cache(path: Path, cache: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    os.replace(tmp, path)  # never a half-written cache


def train(path: Path, names: list[str], tasks: list[str], epochs: int | None = None) -> dict:
    cache = load_cache(path)
    todo = [(t, e) for t in tasks for e in names if e not in cache.get(t, {})]
    start = time.perf_counter()
    for i, (task, expr) in enumerate(todo, 1):
        cache.setdefault(task, {})[expr] = train_once(TASKS[task], expr, epochs)
        if i % 10 == 0 or i == len(todo):
            save_cache(path, cache)
            print(f"[{i}/{len(todo)}] {time.perf_counter() - start:.0f} s  {task} {expr}: "
                  f"{cache[task][expr]['accuracy']:.3f}", flush=True)
    return cache


def speed() -> None:
    """Wall time of `flexact probe` (features and ranking, no training) on the real configs."""
    import subprocess
    import tempfile

    from flexact.tools.digits import write_digits_cifar, write_digits_mnist

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        write_digits_mnist(tmp)
        write_digits_cifar(tmp)
        cases = [("lenet5_mnist.yaml", ["schema:unary_unary", "--limit", "50"], 50),
                 ("resnet18.yaml", ["relu", "sigmoid", "tanh", "leaky_relu", "identity"], 5)]
        for config, candidates, n in cases:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "flexact", "probe", "--config",
                            str(repo / "configs" / config), f"--data.init_args.data_dir={tmp}",
                            "--data.init_args.download=false", "--candidates", *candidates,
                            "--out", f"{tmp}/out", "--db", f"{tmp}/db.sqlite"], check=True,
                           capture_output=True)
            wall = time.perf_counter() - start
            print(f"| {config} | {n} | {wall:.1f} s | {60 * n / wall:.0f} candidates/min |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=["train", "evaluate", "speed", "smoke"])
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.phase == "train":
        train(args.cache, expressions(), args.tasks)
    elif args.phase == "speed":
        speed()
    elif args.phase == "evaluate":
        from probe_eval import evaluate

        evaluate(load_cache(args.cache), args.tasks)
    else:
        import tempfile

        from probe_eval import evaluate

        names = expressions(4, 8)[::3][:10]
        with tempfile.TemporaryDirectory() as tmp:  # never the real cache or reference
            cache = train(Path(tmp) / "cache.json", names, args.tasks, epochs=1)
        evaluate(cache, args.tasks, splits=3, reference=False)


if __name__ == "__main__":
    main()
