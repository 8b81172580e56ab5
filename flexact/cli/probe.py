r"""``flexact probe``: rank candidate activations before training (docs/probe.md).

    flexact probe --config configs/lenet5_mnist.yaml --candidates relu tanh "sin(x)" \\
        schema:binary_unary --limit 200 --out probe --train_top 3

For every candidate, the config's model at initialization with the candidate at every
activation site (FlexAct layers and the backbone's activations) gives the probe's features on
one training batch of the config's data: the candidate's outputs on N(0, 1) and the K-FAC
Fisher spectrum (:mod:`flexact.probe.fisher`). The surrogate (:mod:`flexact.probe.surrogate`)
predicts each candidate's metric from the results database's measurements of this task, or,
with fewer than three, from the reference results of benchmarks/probe.py (output features
only). ``--train_top K`` then fits the top K for real through the same config and records them,
so every probe improves the next.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flexact.errors import ConfigError
from flexact.probe.report import Row, rank_rows, write_csv, write_json, write_png

__all__ = ["main", "resolve_candidates", "task_key"]

REFERENCE = Path(__file__).resolve().parents[1] / "probe" / "reference.json"
MIN_MEASURED = 3  # below this, the task's own results cannot carry a k = 3 regression


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexact probe", description="Rank candidate activations before training, from "
        "training-free features of the config's model (docs/probe.md). Arguments not listed "
        "here (e.g. --trainer.max_epochs=2) go to the config, as for `flexact fit`.")
    parser.add_argument("-c", "--config", action="append", required=True,
                        help="the config of `flexact fit` (repeatable)")
    parser.add_argument("--candidates", nargs="+", default=None, metavar="C",
                        help="names, expressions ('add(tanh(x),sin(x))'), schemas "
                             "('schema:binary_unary' or 'binary(unary(x),unary(x))'); default: "
                             "the config's flexact.candidates")
    parser.add_argument("--limit", type=int, default=None,
                        help="candidates drawn from each schema (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of schema draws and the "
                        "probe's weights")
    parser.add_argument("--out", type=Path, default=Path("probe"),
                        help="folder for probe.json, probe.csv and probe.png")
    parser.add_argument("--db", type=Path, default=Path("probe_results.sqlite"),
                        help="results database (sqlite) read by the surrogate and written by "
                             "--train_top")
    parser.add_argument("--train_top", type=int, default=0, metavar="K",
                        help="fit the top K unmeasured candidates through the config")
    parser.add_argument("--metric", default=None,
                        help="logged metric to record for --train_top (default: val_acc if "
                             "logged, else val_loss)")
    parser.add_argument("--bins", type=int, default=24, help="histogram bins per layer")
    parser.add_argument("--samples", type=int, default=32,
                        help="examples of one training batch the Fisher features use")
    parser.add_argument("--embedding", choices=["none", "umap", "pca"], default="none",
                        help="the surrogate's embedding before k-NN (none: k-NN on the "
                             "standardized features, the benchmark's best; umap: the paper's)")
    return parser


def resolve_candidates(items: Sequence[str], limit: int | None = None,
                       seed: int = 0) -> list[str]:
    """Expand schemas and drop functional duplicates, keeping the first spelling.

    Raises:
        ConfigError: For an unknown name, a malformed expression or an unknown schema.
    """
    from flexact.nn.canonical import SCHEMAS, expand_schema
    from flexact.nn.registry import check_activation_name
    from flexact.probe.prior import candidate_key

    out: dict[str, str] = {}
    for item in items:
        text = item.removeprefix("schema:")
        is_schema = item.startswith("schema:") or text in SCHEMAS or any(
            slot in text for slot in ("unary(", "binary("))
        for name in (expand_schema(text, limit=limit, seed=seed) if is_schema
                     else [check_activation_name(item)]):
            out.setdefault(candidate_key(name), name)
    if not out:
        raise ConfigError("no candidates to probe; pass --candidates")
    return list(out.values())


def task_key(config: Any) -> str:
    """An identifier of the config's task: its model and data sections, candidates aside."""
    model = json.loads(json.dumps(config.get("model"), default=str))
    flexact = (model.get("init_args") or {}).get("flexact") if isinstance(model, dict) else None
    if isinstance(flexact, dict):
        flexact.pop("candidates", None)
        flexact.pop("prior", None)
    text = json.dumps({"model": model, "data": config.get("data")}, sort_keys=True, default=str)
    name = (model.get("class_path", "model") if isinstance(model, dict) else "model")
    return f"{name.rsplit('.', 1)[-1]}:{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def _reference_rows() -> tuple[np.ndarray, list[float]]:
    """Output features and scores of the benchmark's reference expressions."""
    from flexact.nn.registry import get_activation
    from flexact.probe.fisher import output_distribution

    ref = json.loads(REFERENCE.read_text())["scores"]
    feats = np.stack([output_distribution(get_activation(e)).numpy() for e in ref])
    return feats, list(ref.values())


def probe(args: argparse.Namespace, overrides: list[str]) -> list[Row]:
    """Features → predictions → ranking → files (→ training of the top K)."""
    from tqdm.auto import tqdm

    from flexact.cli.probe_engine import ProbeTask, fit_candidate
    from flexact.probe.fisher import output_distribution
    from flexact.probe.results import ResultsDB

    cli_args = [*(f"--config={c}" for c in args.config), *overrides]
    task = ProbeTask.from_cli(cli_args, args.seed, args.samples)
    db = ResultsDB(args.db)
    key = task_key(task.config)
    measured = db.measurements(key)
    default = task.default_candidates()
    names = resolve_candidates(args.candidates or default, args.limit, args.seed)
    from flexact.probe.prior import candidate_key

    keys = [candidate_key(n) for n in names]
    names += [m.candidate for k, m in measured.items() if k not in keys]
    keys = [candidate_key(n) for n in names]
    outputs, spectra = [], {}
    for name, k in zip(tqdm(names, desc="probing", unit="candidate"), keys, strict=True):
        outputs.append(output_distribution(task.activation(name)).numpy())
        spectra[k] = task.spectrum(name, args.bins)
    outputs_arr = np.stack(outputs)
    fisher = np.stack([spectra[k].reshape(-1) for k in keys])
    metric = task.metric_name(args.metric)
    rows, source = _rank(args, names, keys, outputs_arr, fisher, measured,
                         task.higher_is_better(args.metric))
    _write(args, rows, spectra, key, source, metric)
    if args.train_top > 0:
        todo = [r for r in rows if r.measured is None][:args.train_top]
        for i, row in enumerate(todo, 1):
            print(f"training {i}/{len(todo)}: {row.candidate}", flush=True)
            db.record(key, fit_candidate(cli_args, row.candidate, args.out / "train" / str(i),
                                         args.metric))
        rows, source = _rank(args, names, keys, outputs_arr, fisher, db.measurements(key),
                             task.higher_is_better(args.metric))
        _write(args, rows, spectra, key, f"{source}, after training {len(todo)}", metric)
    return rows


def _rank(args: argparse.Namespace, names: list[str], keys: list[str], outputs: np.ndarray,
          fisher: np.ndarray, measured: dict[str, Any], higher: bool) -> tuple[list[Row], str]:
    """Predictions of every candidate from what is measured (or the reference results)."""
    from flexact.probe.surrogate import predict, standardize_blocks

    known = [i for i, k in enumerate(keys) if k in measured]
    if len(known) >= MIN_MEASURED:
        source = f"surrogate on {len(known)} measured candidates of this task"
        feats = standardize_blocks([outputs, fisher])
        predicted = predict(feats, known, [measured[keys[i]].value for i in known],
                            embedding=args.embedding, seed=args.seed)
        higher = measured[keys[known[0]]].higher_is_better
    elif not REFERENCE.exists():
        source = "nothing measured yet (candidates in the order given)"
        predicted = np.zeros(len(names))
    else:
        ref_feats, ref_scores = _reference_rows()
        source = "reference results (benchmarks/probe.py), output features only"
        feats = standardize_blocks([np.concatenate([outputs, ref_feats])])
        known_ref = list(range(len(names), len(names) + len(ref_scores)))
        predicted = predict(feats, known_ref, ref_scores, embedding=args.embedding,
                            seed=args.seed)[:len(names)]
        higher = True  # reference scores are accuracy quantiles
    rows = [Row(n, k, float(p), measured[k].value if k in measured else None)
            for n, k, p in zip(names, keys, predicted, strict=True)]
    return rank_rows(rows, higher), source


def _write(args: argparse.Namespace, rows: list[Row], spectra: dict[str, np.ndarray],
           key: str, source: str, metric: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    header = {"task": key, "metric": metric, "source": source, "db": str(args.db)}
    write_json(args.out / "probe.json", rows, header)
    write_csv(args.out / "probe.csv", rows)
    write_png(args.out / "probe.png", rows, spectra, -12.0, 4.0)
    print(f"{'rank':>4}  {'candidate':<40} {'predicted':>10} {'measured':>10}")
    for row in rows:
        measured = "" if row.measured is None else f"{row.measured:.4f}"
        print(f"{row.rank:>4}  {row.candidate:<40} {row.predicted:>10.4f} {measured:>10}")
    print(f"ranking from {source}; wrote {args.out}/probe.json, probe.csv, probe.png")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``flexact probe``."""
    import sys

    parser = build_parser()
    args, overrides = parser.parse_known_args(None if argv is None else list(argv))
    if args.train_top < 0 or (args.limit is not None and args.limit < 1) or args.bins < 2 \
            or args.samples < 1:
        parser.error("--train_top must be >= 0, --limit and --samples >= 1, --bins >= 2")
    try:
        probe(args, overrides)
    except ConfigError as err:
        print(f"flexact probe: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
