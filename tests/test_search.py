"""`flexact search`: spaces, samplers, studies on a storage, workers, failures, outputs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

import flexact.search.objective as objective_module
from flexact import FlexAct, FlexActSpec
from flexact.cli.search import _drain_stale, open_storage
from flexact.cli.search import main as search_main
from flexact.nn.canonical import fingerprint
from flexact.nn.expressions import ExpressionError
from flexact.search.objective import SearchRun
from flexact.search.oneshot import mean_probabilities, oneshot_scores, ranked
from flexact.search.space import SearchSpace, grammar_mutator

REPO = Path(__file__).resolve().parents[1]
CONFIG = """\
seed_everything: 0
trainer:
  max_epochs: {epochs}
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
model:
  class_path: FlexActRegressor
  init_args:
    backbone:
      class_path: flexact.backbones.MLP
      init_args: {{in_features: 4, hidden: [8], activation: relu}}
    hidden_features: null
    flexact: {{candidates: [relu, tanh]}}
    optimizer:
      class_path: torch.optim.Adam
      init_args: {{lr: 0.01}}
data:
  class_path: SyntheticDataModule
  init_args: {{truth: tanh, n_train: 128, n_val: 32, n_test: 32, batch_size: 32}}
"""
SPACE = ["--space", "binary_unary", "--unary", "relu", "tanh", "sin", "identity", "--binary",
         "add", "mul"]


def _config(tmp_path: Path, epochs: int = 2) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(CONFIG.format(epochs=epochs))
    return path


def _search(tmp_path: Path, *extra: str) -> None:
    search_main(["--config", str(_config(tmp_path)), *SPACE, "--storage",
                 str(tmp_path / "study.sqlite3"), "--out", str(tmp_path / "out"), *extra])


def _study(tmp_path: Path, name: str = "flexact") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'study.sqlite3'}")


def test_a_space_fills_its_slots_canonically_and_mutates_inside_itself() -> None:
    space = SearchSpace("binary_unary", ["relu", "tanh", "sin", "identity"], ["add", "mul"])
    assert space.kinds == ["binary", "unary", "unary"]
    assert space.expression(["add", "tanh", "identity"]) == "add(tanh(x),x)"
    functions = space.functions()
    assert len({fingerprint(f) for f in functions}) == len(functions)
    mutate = grammar_mutator(space)
    rng = random.Random(0)
    children = {mutate([("add(tanh(x),x)", 0.1)], rng)[0] for _ in range(40)}
    keys = {fingerprint(f) for f in functions}
    assert children and all(fingerprint(c) in keys for c in children)
    assert "add(tanh(x),x)" not in children
    with pytest.raises(ExpressionError, match="no valid expression"):
        SearchSpace("binary_unary", [], ["add"])
    with pytest.raises(ExpressionError, match="unknown unary operator 'sine'"):
        SearchSpace("unary", ["sine"])


@pytest.mark.parametrize("sampler", ["random", "tpe", "evolution", "surrogate", "tournament"])
def test_each_sampler_runs_a_study_and_writes_the_outputs(tmp_path: Path, sampler: str) -> None:
    _search(tmp_path, "--sampler", sampler, "--n_trials", "3", "--k", "3")
    study = _study(tmp_path)
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(trials) == 3
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    assert completed and all(t.user_attrs["sampler"] == sampler for t in trials)
    trained = [t for t in completed if "duplicate_of" not in t.user_attrs]
    assert all(t.user_attrs["steps"] > 0 for t in trained)
    if sampler == "tournament":
        first = trained[0]
        assert len(first.user_attrs["expressions"]) == 3
        probs = first.user_attrs["probabilities"]
        assert first.user_attrs["winner"] == max(probs, key=probs.get)
    rows = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    assert len(rows) == 3 and rows[0]["state"] == "COMPLETE"
    assert {"expression", "id_metric", "ood_metric", "steps", "state"} <= set(rows[0])
    assert (tmp_path / "out" / "progress.png").read_bytes()[:4] == b"\x89PNG"
    top = tmp_path / "out" / "top.txt"
    spec = FlexActSpec(candidates_file=str(top))
    assert spec.candidates[0] == rows[0]["expression"]


def test_a_restarted_search_continues_its_study(tmp_path: Path) -> None:
    _search(tmp_path, "--sampler", "random", "--n_trials", "2")
    _search(tmp_path, "--sampler", "random", "--n_trials", "4")
    numbers = [t.number for t in _study(tmp_path).get_trials()]
    assert numbers == [0, 1, 2, 3]  # two more, not four new ones
    _search(tmp_path, "--sampler", "random", "--n_trials", "4")
    assert len(_study(tmp_path).get_trials()) == 4  # already done: nothing runs
    with pytest.raises(SystemExit):  # another space under the same name is refused
        search_main(["--config", str(_config(tmp_path)), "--space", "unary", "--storage",
                     str(tmp_path / "study.sqlite3"), "--out", str(tmp_path / "out")])


def test_a_failing_trial_is_recorded_with_its_reason_and_the_study_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = SearchRun.evaluate
    calls = {"n": 0}

    def flaky(self, trial, expressions):
        calls["n"] += 1
        if calls["n"] == 1:
            raise FloatingPointError("the loss became nan at step 3")
        return real(self, trial, expressions)

    monkeypatch.setattr(SearchRun, "evaluate", flaky)
    _search(tmp_path, "--sampler", "random", "--n_trials", "3")
    trials = _study(tmp_path).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "nan at step 3" in failed[0].user_attrs["fail_reason"]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2


@pytest.mark.parametrize(("extra", "message"), [
    (["--sampler", "annealing"], "unknown sampler 'annealing'"),
    (["--storage", "postgresql+nosuchdriver://nobody@127.0.0.1/x"], "cannot open the storage"),
    (["--space", "bogus"], "unknown schema 'bogus'"),
    (["--unary", "sine"], "unknown unary operator 'sine'"),
    (["--objective", "both", "--sampler", "tpe"], "use --sampler nsga2 or random"),
    (["--tournament_score", "best"], "argument --tournament_score: invalid choice: 'best'"),
    (["--tournament_top", "9", "--k", "8"], "1 <= --tournament_top <= --k"),
])
def test_bad_search_input_is_a_one_line_error(tmp_path: Path, extra: list[str], message: str,
                                              capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        search_main(["--config", str(_config(tmp_path)), "--storage",
                     str(tmp_path / "s.sqlite3"), "--out", str(tmp_path / "o"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_config_without_activation_sites_is_refused(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "plain.yaml"
    config.write_text(_config(tmp_path).read_text().replace(
        "class_path: FlexActRegressor", "class_path: tests.test_probe.PlainClassifier").replace(
        "in_features: 4", "in_features: 10").replace(
        "class_path: SyntheticDataModule", "class_path: TeacherDataModule").replace(
        "{truth: tanh, n_train: 128, n_val: 32, n_test: 32, batch_size: 32}",
        "{n_samples: 200, batch_size: 32}"))
    with pytest.raises(SystemExit):
        search_main(["--config", str(config), "--storage", str(tmp_path / "s.sqlite3"),
                     "--out", str(tmp_path / "o")])
    assert "no activation sites" in capsys.readouterr().err


def test_optuna_dashboard_serves_the_study(tmp_path: Path) -> None:
    dashboard = pytest.importorskip("optuna_dashboard")
    _search(tmp_path, "--sampler", "random", "--n_trials", "1")
    app = dashboard.wsgi(f"sqlite:///{tmp_path / 'study.sqlite3'}")
    status = {}
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/studies"}
    setup_testing_defaults(environ)
    body = b"".join(app(environ, lambda s, h, *exc: status.setdefault("s", s)))
    assert status["s"].startswith("200")
    assert "flexact" in body.decode()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::optuna.exceptions.ExperimentalWarning")
def test_a_worker_leaving_fails_and_reruns_a_dead_workers_trial(tmp_path: Path) -> None:
    # The race CI caught: the survivor ends its last trial before the victim's heartbeat goes
    # stale, so Optuna never fails the victim's trial. The worker must wait it out and re-run it.
    storage = open_storage(str(tmp_path / "s.sqlite3"), heartbeat=1)
    study = optuna.create_study(study_name="s", storage=storage)
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage.record_heartbeat(dead._trial_id)  # then never again: its worker was killed
    seen: list[dict] = []

    def objective(trial: optuna.Trial) -> float:
        seen.append(trial.params)
        return trial.suggest_float("x", 0, 1)

    _drain_stale(study, objective, heartbeat=1)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]
    assert seen == [dead.params] == [study.trials[1].params]  # the retry, same parameters


def test_a_worker_leaving_does_not_wait_without_running_trials(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="s", storage=open_storage(str(tmp_path / "s.db"), 1))
    start = time.monotonic()
    _drain_stale(study, lambda trial: 0.0, heartbeat=5)
    assert time.monotonic() - start < 4 and not study.trials  # waiting would take ≥ 5 s


@pytest.mark.slow
def test_two_workers_share_a_study_and_survive_a_kill(tmp_path: Path) -> None:
    config = _config(tmp_path, epochs=60)
    storage = tmp_path / "study.sqlite3"
    args = [sys.executable, "-m", "flexact", "search", "--config", str(config), *SPACE,
            "--sampler", "random", "--n_trials", "6", "--storage", str(storage), "--heartbeat",
            "1", "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [subprocess.Popen([*args, "--seed", str(s)], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for s in (1, 2)]
    url = f"sqlite:///{storage}"
    deadline = time.time() + 120
    victim = None
    while time.time() < deadline and victim is None:  # kill worker 0 in the middle of a fit
        time.sleep(1)
        try:
            study = optuna.load_study(study_name="flexact", storage=url)
        except KeyError:
            continue
        owners = {t.user_attrs.get("worker", "").rpartition(":")[2]
                  for t in study.get_trials() if t.state == TrialState.RUNNING}
        running = [w for w in workers if str(w.pid) in owners]
        if running:  # kill a worker in the middle of its fit
            victim = running[0]
            victim.send_signal(signal.SIGKILL)
    assert victim is not None, "no trial started"
    victim.wait(timeout=30)
    owned = [t for t in optuna.load_study(study_name="flexact", storage=url).get_trials()
             if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")]
    assert any(t.state == TrialState.RUNNING for t in owned), "killed between two trials"
    survivor = next(w for w in workers if w is not victim)
    assert survivor.wait(timeout=300) == 0
    trials = optuna.load_study(study_name="flexact", storage=url).get_trials()
    states = [t.state for t in trials]
    assert TrialState.FAIL in states  # the killed worker's trial
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= 6 - states.count(TrialState.FAIL)
    trained = [tuple(t.user_attrs["expressions"]) for t in trials
               if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert len(trained) == len(set(trained))  # no expression trained twice
    assert not any(t.state == TrialState.RUNNING for t in trials)
    killed = next(t for t in trials if t.state == TrialState.FAIL)
    assert any(t.user_attrs.get("expressions") == killed.user_attrs["expressions"]
               and t.number > killed.number and t.state == TrialState.COMPLETE
               for t in trials)  # re-queued with its expression and finished by the survivor


def test_both_objectives_run_nsga2_on_id_and_ood(tmp_path: Path) -> None:
    _search(tmp_path, "--sampler", "nsga2", "--objective", "both", "--n_trials", "2")
    study = _study(tmp_path)
    assert len(study.directions) == 2
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert done and all(len(t.values) == 2 for t in done)
    assert all(t.values == [t.user_attrs["scores"]["id"], t.user_attrs["scores"]["ood"]]
               for t in done if "duplicate_of" not in t.user_attrs)


class _AlwaysPrune:
    """A stand-in trial whose pruner stops every fit after its first validation."""

    number = 0

    def __init__(self) -> None:
        self.reports: list[tuple[float, int]] = []
        self.user_attrs: dict = {}

    def report(self, value: float, step: int) -> None:
        self.reports.append((value, step))

    def should_prune(self) -> bool:
        return True

    def set_user_attr(self, key: str, value: object) -> None:
        self.user_attrs[key] = value


def test_the_pruning_callback_stops_a_fit_the_pruner_rejects(tmp_path: Path) -> None:
    config = _config(tmp_path, epochs=5)
    run = SearchRun([f"--config={config}"], "val_loss", "ood", root=tmp_path / "trials")
    trial = _AlwaysPrune()
    with pytest.raises(optuna.TrialPruned):
        run.evaluate(trial, ["sin(x)"])
    assert len(trial.reports) == 1 and trial.reports[0][1] == 0  # reported epoch 0, then stopped
    assert 0 < trial.user_attrs["steps"] < 5 * 4  # fewer steps than the 5 epochs of 4 batches


def test_oneshot_scores_commit_each_candidate_with_shared_weights_and_restore() -> None:
    model = nn.Sequential(nn.Linear(1, 1), FlexAct(candidates=["relu", "identity", "neg(x)"]))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[1].logits.copy_(torch.tensor([5.0, 0.0, 0.0]))  # relu is the most probable
    layer, x = model[1], torch.linspace(-2, 2, 41).unsqueeze(1)

    def mse() -> float:
        return float(nn.functional.mse_loss(model(x), x))  # identity fits it exactly

    probs = mean_probabilities(model, layer.candidate_names)
    scores = oneshot_scores(model, ["1"], layer.candidate_names, mse)
    assert ranked(probs, maximize=True)[0] == "relu"
    assert ranked(scores) == ["identity", "relu", "neg(x)"] and scores["identity"] == 0.0
    assert model[1] is layer  # the FlexAct layer is back, weights untouched

    def broken() -> float:
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError):
        oneshot_scores(model, ["1"], ["tanh"], broken)
    assert model[1] is layer
    assert ranked({"a": float("nan"), "b": 2.0, "c": 1.0}) == ["c", "b", "a"]
    assert ranked({"a": float("inf"), "b": 0.9, "c": 0.95}, maximize=True) == ["c", "b", "a"]


class _Trial(_AlwaysPrune):
    """A stand-in trial whose pruner never stops a fit."""

    def should_prune(self) -> bool:
        return False


def test_a_oneshot_tournament_picks_the_best_validation_metric_not_the_most_probable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, seen = oneshot_scores, {}

    def rigged(model, sites, candidates, evaluate):
        # The least probable candidate gets the best validation metric.
        seen["real"] = real(model, sites, candidates, evaluate)
        seen["probs"] = probs = mean_probabilities(model, candidates)
        least = min(candidates, key=probs.get)
        return {c: 0.0 if c == least else 1.0 + seen["real"][c] for c in candidates}

    monkeypatch.setattr(objective_module, "oneshot_scores", rigged)
    run = SearchRun([f"--config={_config(tmp_path)}"], root=tmp_path / "trials",
                    tournament_score="oneshot")
    candidates = ["tanh", "identity", "sin(x)"]
    result = run.evaluate(_Trial(), candidates)
    probs = result["probabilities"]
    assert result["winner"] == min(probs, key=probs.get) != max(probs, key=probs.get)
    assert result["oneshot"][result["winner"]] == 0.0 and result["eval_passes"] == 3
    assert all(v > 0 for v in seen["real"].values())  # real validation passes ran
    assert result["steps"] == 2 * 4 + 4  # 2 shared epochs + 1 fine-tune epoch, 4 batches each


def test_a_finetune_tournament_tunes_the_top_oneshot_candidates_and_counts_their_steps(
        tmp_path: Path) -> None:
    run = SearchRun([f"--config={_config(tmp_path)}"], root=tmp_path / "trials",
                    tournament_score="finetune", top=2)
    result = run.evaluate(_Trial(), ["tanh", "identity", "sin(x)"])
    tuned, oneshot = result["finetuned"], result["oneshot"]
    assert set(tuned) == set(ranked(oneshot)[:2]) and result["eval_passes"] == 3 + 2
    assert result["winner"] == min(tuned, key=tuned.get)
    assert result["scores"]["ood"] == pytest.approx(tuned[result["winner"]])  # it is kept
    assert result["steps"] == 2 * 4 + 2 * 4


def test_a_tournament_keeps_the_heads_resolved_selection_gradient(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tournament's new FlexAct layers keep what the module resolved: a head before an
    affine map compares candidates standardized ("auto"), the swapped backbone sites raw."""
    config = _config(tmp_path)
    config.write_text(config.read_text().replace("hidden_features: null", "hidden_features: 8"))
    real, seen = oneshot_scores, {}

    def spy(model, sites, candidates, evaluate):
        seen.update({name: layer.selection_gradient for name, layer in model.named_modules()
                     if isinstance(layer, FlexAct)})
        return real(model, sites, candidates, evaluate)

    monkeypatch.setattr(objective_module, "oneshot_scores", spy)
    run = SearchRun([f"--config={config}"], root=tmp_path / "trials",
                    tournament_score="oneshot")
    run.evaluate(_Trial(), ["tanh", "identity"])
    assert seen.pop("head.flexact") == "standardized"
    assert seen and set(seen.values()) == {"raw"}  # the backbone's sites


def test_a_tournament_everywhere_keeps_one_selection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With swap_backbone the module shares one selection; the tournament's new layers do too,
    as ``flexact fit`` of the same config would (they each had their own before)."""
    config = _config(tmp_path)
    config.write_text(config.read_text().replace("hidden_features: null",
                                                 "hidden_features: null\n    swap_backbone: true"))
    real, seen = oneshot_scores, []

    def spy(model, sites, candidates, evaluate):
        seen.extend(layer for layer in model.modules() if isinstance(layer, FlexAct))
        return real(model, sites, candidates, evaluate)

    monkeypatch.setattr(objective_module, "oneshot_scores", spy)
    run = SearchRun([f"--config={config}"], root=tmp_path / "trials",
                    tournament_score="oneshot")
    run.evaluate(_Trial(), ["tanh", "identity"])
    assert len(seen) == 2
    assert seen[0].candidate_names == ("tanh", "identity")
    assert seen[0].logits is seen[1].logits  # one selection
    assert not any(layer.regularize for layer in seen)  # α = 0: no gradient norms needed
