r"""``flexact search``: discover activations on Optuna (docs/search.md).

    flexact search --config configs/ood.yaml --space binary_unary --sampler tournament \\
        --n_trials 40 --study ood --storage search.sqlite3

A study lives in an Optuna storage: an sqlite file by default, any database URL, or a journal
file (``*.log``) for file systems without locking databases. A second worker is another
``flexact search`` with the same ``--study`` and ``--storage``; ``--n_trials`` is the study's
total, so a restarted search continues where it stopped. With an RDB storage, workers send
heartbeats: the trial of a worker killed mid-fit is marked failed and re-queued once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexact.errors import ConfigError

__all__ = ["main", "open_storage"]


def build_parser() -> argparse.ArgumentParser:
    from flexact.search.oneshot import TOURNAMENT_SCORES
    from flexact.search.proposers import SAMPLERS

    p = argparse.ArgumentParser(
        prog="flexact search", description="Search activation expressions: each trial fits "
        "the config with its expression at every activation site (docs/search.md). Arguments "
        "not listed here go to the config, as for `flexact fit`.")
    p.add_argument("-c", "--config", action="append", required=True, help="a `flexact fit` "
                   "config (repeatable)")
    p.add_argument("--space", default="binary_unary", help="schema (name or pattern)")
    p.add_argument("--unary", nargs="+", default=None, help="unary operators of the slots")
    p.add_argument("--binary", nargs="+", default=None, help="binary operators (wadd:0.1 for "
                   "a weighted sum)")
    p.add_argument("--sampler", default="tpe", help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--n_trials", type=int, default=20, help="completed or pruned trials of "
                   "the whole study (failed ones do not count)")
    p.add_argument("--study", default="flexact", help="study name (reused: continues)")
    p.add_argument("--storage", default="search.sqlite3", help="sqlite file, database URL, "
                   "or journal file (*.log)")
    p.add_argument("--objective", choices=["ood", "id", "both"], default="ood",
                   help="validation (OOD) metric, test (in-distribution) metric, or both "
                        "(NSGA-II)")
    p.add_argument("--metric", default="val_loss", help="validation metric to score")
    p.add_argument("--k", type=int, default=8, help="candidates per tournament trial")
    p.add_argument("--finetune_epochs", type=int, default=1, help="committed fine-tune "
                   "after a tournament")
    p.add_argument("--tournament_score", choices=TOURNAMENT_SCORES, default="probability",
                   help="how a tournament picks its winner: the highest mean selection "
                   "probability (follows the training loss), the best validation metric of "
                   "the network committed to each candidate with the shared weights "
                   "(oneshot), or the best validation metric after fine-tuning the "
                   "--tournament_top best one-shot candidates (finetune; their steps count)")
    p.add_argument("--tournament_top", type=int, default=2, help="candidates the finetune "
                   "rule fine-tunes")
    p.add_argument("--mutator", default=None, help="module:function proposing children "
                   "(evolution); default: the grammar's")
    p.add_argument("--out", type=Path, default=Path("search"), help="leaderboard, plot, top")
    p.add_argument("--top", type=int, default=5, help="expressions in OUT/top.txt")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--heartbeat", type=int, default=5, help="seconds between heartbeats")
    return p


def open_storage(spec: str, heartbeat: int = 5) -> Any:
    """An Optuna storage from a path or URL.

    Raises:
        ConfigError: If it cannot be opened.
    """
    import optuna
    from optuna import storages

    retry = storages.RetryHeartbeatStaleTrialCallback

    try:
        if spec.endswith((".log", ".journal")):
            from optuna.storages.journal import JournalFileBackend

            Path(spec).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(spec))
        url = spec if "://" in spec else f"sqlite:///{Path(spec).resolve()}"
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
            heartbeat_stale_trial_callback=retry(max_retry=1),
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)
    except Exception as err:  # sqlalchemy, OSError, ValueError: all mean "cannot open"
        raise ConfigError(f"cannot open the storage {spec!r}: {type(err).__name__}: {err}; "
                          "give an sqlite file, a database URL or a journal file (*.log)"
                          ) from None


def _mutator(spec: str | None) -> Any:
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"cannot load the mutator {spec!r} ({err}); give module:function")\
            from None


def _drain_stale(study: Any, objective: Any, heartbeat: int) -> None:
    """Before a worker leaves, fail and re-run trials of workers that died mid-fit.

    Optuna fails stale trials only when a trial starts, so a worker that ends its last trial
    within the grace period of another worker's death would leave that trial RUNNING forever.
    Poll for one grace period (plus a beat): stale trials are failed, their retries (WAITING)
    run here; trials still heartbeating after that belong to live workers and are theirs.
    """
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    if getattr(study._storage, "get_heartbeat_interval", lambda: None)() is None:
        return  # journal files have no heartbeats
    deadline = time.monotonic() + 4 * heartbeat + 1
    while time.monotonic() < deadline:
        states = [t.state for t in study.get_trials(deepcopy=False)]
        if TrialState.RUNNING not in states and TrialState.WAITING not in states:
            return
        fail_stale_trials(study)
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        if waiting:
            study.optimize(objective, n_trials=waiting, gc_after_trial=True)
            deadline = time.monotonic() + 4 * heartbeat + 1
        else:
            time.sleep(heartbeat)


def run(args: argparse.Namespace, overrides: list[str]) -> Any:
    """Create or load the study, run this worker's trials, write the outputs."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from flexact.search.objective import SearchRun
    from flexact.search.proposers import SAMPLERS, make_proposer, make_sampler
    from flexact.search.report import write_outputs
    from flexact.search.space import SearchSpace
    from flexact.search.trial import make_objective

    if args.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {args.sampler!r}; choose one of "
                          f"{', '.join(SAMPLERS)}")
    if args.objective == "both" and args.sampler not in ("nsga2", "random"):
        raise ConfigError("--objective both is multi-objective: use --sampler nsga2 or random")
    space = SearchSpace(args.space, args.unary, args.binary)
    cli_args = [*(f"--config={c}" for c in args.config), *overrides]
    from flexact.cli.probe_engine import ProbeTask

    task = ProbeTask.from_cli(cli_args, args.seed)  # checks the config has activation sites
    storage = open_storage(args.storage, args.heartbeat)
    search = SearchRun(cli_args, args.metric, args.objective, args.finetune_epochs,
                       args.out / "trials", args.tournament_score, args.tournament_top)
    directions = ["minimize", "minimize"] if args.objective == "both" else [
        "maximize" if search.maximize else "minimize"]
    settings = {"space": args.space, "unary": space.unary, "binary": space.binary,
                "objective": args.objective, "metric": args.metric}
    study = optuna.create_study(study_name=args.study, storage=storage, load_if_exists=True,
                                sampler=make_sampler(args.sampler, args.seed,
                                                     args.objective == "both"),
                                directions=directions)
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", settings)
    elif saved != settings:
        raise ConfigError(f"study {args.study!r} was created with {saved}; this search asks "
                          f"for {settings}: use another --study name")
    features = None
    if args.sampler in ("surrogate", "tournament"):
        from flexact.search.features import space_features

        features = lambda names: space_features(task, names)  # noqa: E731
    proposer = make_proposer(args.sampler, space, args.seed, k=args.k,
                             mutator=_mutator(args.mutator), features=features)
    # Failed trials do not count toward the total: a killed worker's re-queued trial still
    # runs. Each invocation runs at most `remaining` trials, so failures cannot loop forever.
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    remaining = args.n_trials - len(study.get_trials(deepcopy=False, states=done))
    if remaining > 0:
        study.optimize(make_objective(search, proposer, args.sampler), n_trials=remaining,
                       callbacks=[MaxTrialsCallback(args.n_trials, states=done)],
                       gc_after_trial=True)
    _drain_stale(study, make_objective(search, proposer, args.sampler), args.heartbeat)
    write_outputs(study, args.out, args.top)
    return study


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``flexact search``."""
    parser = build_parser()
    args, overrides = parser.parse_known_args(None if argv is None else list(argv))
    if args.n_trials < 1 or args.k < 2 or args.top < 1 or args.finetune_epochs < 0 \
            or not 1 <= args.tournament_top <= args.k:
        parser.error("--n_trials and --top must be >= 1, --k >= 2, --finetune_epochs >= 0, "
                     "1 <= --tournament_top <= --k")
    try:
        run(args, overrides)
    except ConfigError as err:
        print(f"flexact search: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
