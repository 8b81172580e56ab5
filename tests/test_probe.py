"""`flexact probe`: the CLI on tiny data, the results database, the surrogate, the prior."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flexact import ConfigError, FlexAct
from flexact.backbones import MLP, CifarResNet
from flexact.cli.probe import main as probe_main
from flexact.cli.probe import resolve_candidates, task_key
from flexact.modules import FlexActClassifier
from flexact.nn.expressions import Expression
from flexact.probe.report import Row, rank_rows, write_json
from flexact.probe.results import Measurement, ResultsDB
from flexact.probe.sites import activation_sites, with_activation
from flexact.probe.surrogate import predict, standardize_blocks

CONFIG = """\
seed_everything: 0
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
model:
  class_path: FlexActClassifier
  init_args:
    backbone:
      class_path: flexact.backbones.MLP
      init_args: {in_features: 10, hidden: [16], activation: relu}
    hidden_features: 8
    flexact: {candidates: [relu, tanh]}
    optimizer:
      class_path: torch.optim.Adam
      init_args: {lr: 0.01}
data:
  class_path: TeacherDataModule
  init_args: {n_samples: 800, batch_size: 64}
"""


class PlainClassifier(FlexActClassifier):
    """A module with no activation sites at all (for the probe's error)."""

    def configure_models(self) -> None:
        self.model = nn.Sequential(nn.Linear(10, 2))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "teacher.yaml"
    path.write_text(CONFIG)
    return path


def _run(args: list[str]) -> None:
    probe_main(args)


def test_probe_ranks_writes_its_files_and_trains_the_top_k(config: Path, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture) -> None:
    out, db = tmp_path / "out", tmp_path / "results.sqlite"
    candidates = ["relu", "tanh", "sin(x)", "zero(x)", "mul(x,sigmoid(x))", "silu(x)"]
    _run(["--config", str(config), "--candidates", *candidates, "--out", str(out), "--db",
          str(db), "--train_top", "3"])
    captured = capfd.readouterr()
    assert "probing" in captured.err  # the progress bar
    report = json.loads((out / "probe.json").read_text())
    rows = report["candidates"]
    # silu(x) and mul(x,sigmoid(x)) are one function: probed once.
    assert sorted(r["rank"] for r in rows) == [1, 2, 3, 4, 5]
    assert {r["canonical"] for r in rows} >= {"silu(x)", "relu(x)", "zero(x)"}
    assert report["metric"] == "val_acc" and "surrogate on 3 measured" in report["source"]
    with (out / "probe.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 5
    assert (out / "probe.png").read_bytes()[:4] == b"\x89PNG"
    with sqlite3.connect(db) as con:
        stored = con.execute("select canonical, metric, value from results").fetchall()
    assert len(stored) == 3 and all(m == "val_acc" and 0 <= v <= 1 for _, m, v in stored)
    measured = {r["canonical"]: r["measured"] for r in rows if r["measured"] is not None}
    assert set(measured) == {c for c, _, _ in stored}
    # Ranked by what is known: measured values in order, best first.
    values = [r["measured"] if r["measured"] is not None else r["predicted"] for r in rows]
    assert values == sorted(values, reverse=True)
    # A second probe of the same task starts from the database.
    _run(["--config", str(config), "--candidates", "relu", "elu(x)", "--out", str(out), "--db",
          str(db)])
    again = json.loads((out / "probe.json").read_text())
    assert "surrogate on 3 measured" in again["source"]
    assert len(again["candidates"]) == 4  # the two asked for, and the measured others


def test_prior_probe_json_sets_the_initial_logits(tmp_path: Path) -> None:
    rows = rank_rows([Row("relu", "relu", 0.9), Row("tanh", "tanh", 0.5),
                      Row("sin(x)", "sin(x)", 0.7)], higher_is_better=True)
    path = tmp_path / "probe.json"
    write_json(path, rows, {"task": "t"})
    layer = FlexAct(candidates=["tanh", "relu", "sin(x)"], prior=str(path))
    probs = layer.probabilities()
    weights = {r.candidate: r.weight for r in rows}
    expected = torch.tensor([weights["tanh"], weights["relu"], weights["sin(x)"]])
    torch.testing.assert_close(probs, expected / expected.sum())
    assert probs.argmax() == 1
    uniform = FlexAct(candidates=["tanh", "relu", "sin(x)"]).probabilities()
    assert not torch.allclose(uniform, probs)
    # An expression matches by its canonical form.
    assert FlexAct(candidates=["relu", "sin(x)"], prior=str(path)).probabilities()[0] > 0.5
    with pytest.raises(ConfigError, match=r"no ranking for candidates \['gelu'\]"):
        FlexAct(candidates=["relu", "gelu"], prior=str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        FlexAct(candidates=["relu"], prior=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"not a probe\.json"):
        FlexAct(candidates=["relu"], prior=str(tmp_path / "bad.json"))


@pytest.mark.parametrize(("candidates", "message"), [
    (["relu(x"], "ends early"),
    (["add(relu(x),sine(x))"], "bad token 'sine'"),
    (["schema:bogus"], "unknown schema 'bogus'"),
    (["swish_gamma"], "unknown activation 'swish_gamma'"),
])
def test_bad_candidates_are_one_line_errors(config: Path, tmp_path: Path, candidates: list[str],
                                            message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _run(["--config", str(config), "--candidates", *candidates, "--out",
              str(tmp_path / "o"), "--db", str(tmp_path / "db.sqlite")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_config_without_activation_sites_is_a_clear_error(config: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    text = config.read_text().replace("class_path: FlexActClassifier",
                                      "class_path: tests.test_probe.PlainClassifier")
    config.write_text(text)
    with pytest.raises(SystemExit):
        _run(["--config", str(config), "--out", str(tmp_path / "o"), "--db",
              str(tmp_path / "db.sqlite")])
    assert "no activation sites" in capsys.readouterr().err


def test_sites_are_activations_and_flexact_layers_not_identity_placeholders() -> None:
    net = CifarResNet(activation="relu")
    sites = activation_sites(net)
    assert sites and all(isinstance(net.get_submodule(s), nn.ReLU) for s in sites)
    swapped = with_activation(net, "sin(x)")
    assert all(isinstance(swapped.get_submodule(s), Expression) for s in sites)
    assert not any(isinstance(m, nn.ReLU) for m in swapped.modules())
    assert any(isinstance(m, nn.ReLU) for m in net.modules())  # the original is untouched
    head = nn.Sequential(MLP(4, (8,), activation="flexact"), nn.Identity(), nn.Linear(8, 2))
    (site,) = activation_sites(head)  # the FlexAct layer, not its candidates nor Identity
    assert isinstance(head.get_submodule(site), FlexAct)
    with pytest.raises(ConfigError, match="no activation sites"):
        activation_sites(nn.Sequential(nn.Linear(2, 2), nn.Identity()))


def test_schemas_expand_and_duplicates_collapse() -> None:
    names = resolve_candidates(["relu", "relu(x)", "schema:unary", "mul(x,sigmoid(x))"],
                               limit=5, seed=0)
    from flexact.probe.prior import candidate_key

    assert names[0] == "relu" and "relu(x)" not in names  # relu computes relu(x)
    keys = [candidate_key(n) for n in names]
    assert len(keys) == len(set(keys)) and 5 <= len(names) <= 7
    assert "silu(x)" in keys


def test_the_task_key_ignores_candidates_but_not_the_model() -> None:
    base = {"model": {"class_path": "M", "init_args": {"flexact": {"candidates": ["relu"]},
                                                       "alpha": 0.3}}, "data": {"x": 1}}
    other = json.loads(json.dumps(base))
    other["model"]["init_args"]["flexact"]["candidates"] = ["tanh"]
    assert task_key(base) == task_key(other)
    other["model"]["init_args"]["alpha"] = 0.0
    assert task_key(base) != task_key(other)


def test_the_results_database_keeps_the_latest_and_reports_bad_files(tmp_path: Path) -> None:
    db = ResultsDB(tmp_path / "sub" / "r.sqlite")
    db.record("t", Measurement("relu", "relu", "val_acc", 0.5, True, 10, 1.0))
    db.record("t", Measurement("relu", "relu", "val_acc", 0.7, True, 10, 1.0))
    db.record("u", Measurement("tanh", "tanh", "val_acc", 0.2, True))
    assert {k: m.value for k, m in db.measurements("t").items()} == {"relu": 0.7}
    assert ResultsDB(tmp_path / "sub" / "r.sqlite").measurements("u")["tanh"].value == 0.2
    (tmp_path / "junk.sqlite").write_text("not a database " * 100)
    with pytest.raises(ConfigError, match="cannot open the results database"):
        ResultsDB(tmp_path / "junk.sqlite")


@pytest.mark.parametrize("embedding", ["umap", "pca", "none"])
def test_the_surrogate_predicts_unmeasured_points_from_their_neighbours(embedding: str) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 5
    labels = np.repeat(np.arange(4), 15)
    feats = centres[labels] + rng.normal(size=(60, 6)) * 0.1
    value = labels.astype(float)  # each cluster shares its value
    known = [i for i in range(60) if i % 3]
    pred = predict(standardize_blocks([feats]), known, value[known], embedding=embedding)
    held = [i for i in range(60) if i % 3 == 0]
    assert np.abs(pred[held] - value[held]).max() < 0.5
    with pytest.raises(ConfigError, match="at least one measured"):
        predict(feats, [], [])


def test_probe_runs_on_a_real_config_with_mnist_files_on_disk(tmp_path: Path) -> None:
    from flexact.tools.digits import write_digits_mnist

    write_digits_mnist(tmp_path / "data")
    repo = Path(__file__).resolve().parents[1]
    _run(["--config", str(repo / "configs" / "lenet5_mnist.yaml"),
          f"--data.init_args.data_dir={tmp_path / 'data'}", "--data.init_args.download=false",
          "--candidates", "relu", "schema:unary", "--limit", "3", "--out", str(tmp_path / "o"),
          "--db", str(tmp_path / "db.sqlite")])
    rows = json.loads((tmp_path / "o" / "probe.json").read_text())["candidates"]
    assert 2 <= len(rows) <= 4 and rows[0]["rank"] == 1
    assert "reference results" in json.loads((tmp_path / "o" / "probe.json").read_text())[
        "source"]
