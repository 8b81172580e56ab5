from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types
from pathlib import Path

import pytest

from .conftest import REPO


def _load(name: str) -> types.ModuleType:
    """Import a benchmark script (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_side_by_side_models_train_independently() -> None:
    """A model trained beside others must equal the same model trained alone."""
    table1 = _load("table1")
    config = table1.load_config()
    config["data"]["init_args"].update(n_train=128, n_val=32, n_test=64)
    alone = table1.run_truth("tanh", ["tanh"], 1, config, epochs=1, commit=False)
    beside = table1.run_truth("tanh", ["relu", "tanh"], 1, config, epochs=1, commit=False)
    assert alone[0]["model"] == beside[1]["model"] == "tanh"
    assert alone[0]["mse"] == pytest.approx(beside[1]["mse"], rel=1e-4)


def test_table1_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    table1 = _load("table1")
    stats = table1.main(["--seeds", "2", "--epochs", "1", "--no-write"])
    out = capsys.readouterr().out
    assert "| FlexAct α=0.3 |" in out and "(0.4328)" in out  # the paper's numbers beside ours
    assert stats["runs"] == 10
    assert set(stats["ranks"]) == {"FlexAct α=0.3", "FlexAct α=0", "FlexAct α=0.3 + commit",
                                   "FlexAct α=0 + commit"}
    assert 0 <= stats["correct"]["FlexAct α=0.3"] <= 10


@pytest.mark.parametrize("extra", [[], ["--bf16"]], ids=["float32", "bf16"])
def test_overhead_benchmark_smoke(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rows = _load("overhead").main(["--batch", "2", "--repeats", "1", "--steps", "1",
                                   "--no-write", *extra])
    assert [r["comparison"].split(":")[0] for r in rows] == [
        "ResNet18", "heads alone on (2, 512) features", "ResNet18", "ResNet18", "ResNet18",
        "layer alone on (8, 64, 32, 32)", "heads alone on (2, 512) features, FlexAct standardized"]
    for row in rows:
        assert row["time_ratio"] > 0 and row["memory_ratio"] >= 1.0
        assert 0 < row["base_kernels"] <= row["flexact_kernels"]
    committed = next(r for r in rows if r["comparison"].endswith("committed"))
    assert committed["memory_ratio"] == pytest.approx(1.0, abs=0.01)  # the ReLU network's bytes
    assert committed["flexact_kernels"] <= committed["base_kernels"] + 10
    out = capsys.readouterr().out
    assert "time ratio" in out and "Head overhead measured directly" in out
    assert "with the standardized selection gradient" in out


def test_pipeline_benchmark_smoke() -> None:
    result = _load("pipeline").main(["--images", "20", "--batch", "10", "--repeats", "2",
                                     "--no-write"])
    assert result["cli_s"] > 0 and result["hand_s"] > 0
    assert result["ratio"] == pytest.approx(result["cli_s"] / result["hand_s"])


def test_results_sections_are_replaced_not_duplicated(tmp_path: object,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    results = _load("results")
    path = tmp_path / "RESULTS.md"  # type: ignore[operator]
    path.write_text("# Benchmark results\n\nhand-written notes\n")
    monkeypatch.setattr(results, "RESULTS", path)
    monkeypatch.setattr(sys, "argv", ["/somewhere/benchmarks/demo.py", "--seeds", "2"])
    results.write_section("demo", "Demo", 3.0, "first")
    results.write_section("demo", "Demo", 4.0, "second")
    text = path.read_text()
    assert text.count("<!-- demo:start -->") == 1 and "second" in text and "first" not in text
    assert "hand-written notes" in text
    assert "Command: `python benchmarks/demo.py --seeds 2`" in text and "Wall time: 4 s" in text


def test_gpu_checks_script_runs_every_benchmark_and_collects_the_logs(tmp_path: Path) -> None:
    """The prepared GPU run, with stand-ins for ``python`` and ``nvidia-smi`` (no GPU here)."""
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_python = bin_dir / "python"
    fake_python.write_text('#!/bin/sh\necho "$@" >> "$OUT/calls.txt"\n'
                           'echo "| row | for $* |"\n')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho H200\n")
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out)}
    root = Path(__file__).resolve().parents[1]
    subprocess.run(["bash", "benchmarks/gpu_checks.sh"], cwd=root, env=env, check=True,
                   timeout=60)
    calls = (out / "calls.txt").read_text().splitlines()
    assert calls == ["-", "benchmarks/overhead.py", "benchmarks/pipeline.py",
                     "benchmarks/overhead.py --compile"]
    summary = (out / "summary.txt").read_text()
    assert summary.count("exit 0") == 3 and "| row | for benchmarks/pipeline.py |" in summary
    assert (out / "RESULTS.md").read_text() == (root / "benchmarks/RESULTS.md").read_text()
    assert (out / "nvidia-smi.txt").read_text() == "H200\n"


def test_sweep_benchmark_smoke(capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One FlexAct run against the five-run sweep: every cell has a pick and a time ratio."""
    sweep = _load("sweep")
    fit_one, seeds = sweep.fit_one, []

    def spy(task: object, seed: int, *args: object) -> dict:
        seeds.append(seed)
        return fit_one(task, seed, *args)

    monkeypatch.setattr(sweep, "fit_one", spy)
    cells = sweep.main(["--smoke", "--no-write", "--first-seed", "4"])
    out = capsys.readouterr().out
    assert seeds and set(seeds) == {4}  # every run on the first seed asked for
    assert "[synthetic-tanh] " in out and " × 1 seeds (4–4) in " in out
    assert ("| task | FlexAct | pick per seed (head; hidden layers) | decisive | top p | commit at "
            "| = best | within noise | FlexAct metric | Δ vs best | wall FlexAct / sweep | "
            "steps FlexAct / sweep | s/step ratio |") in out
    assert "| task | metric | relu | sigmoid | tanh | leaky_relu | identity | best |" in out
    # Head-only FlexAct on a backbone answers the head-only sweep (the backbone keeps ReLU).
    assert {(c["task"], c["flexact"]) for c in cells} == {
        (task + (" (head only)" if variant.startswith("head") and task != "synthetic-tanh"
                 else ""), variant)
        for task in ("synthetic-tanh", "teacher-d8-relu", "digits-lenet5", "text-cnn")
        for variant in sweep.SMOKE_VARIANTS
        if task != "synthetic-tanh" or variant.startswith("head")}
    for task in ("teacher-d8-relu", "digits-lenet5", "text-cnn"):
        assert f"| {task} (head only) | test accuracy % |" in out
    assert "| synthetic-tanh (head only)" not in out
    for cell in cells:
        assert cell["picks"] and all(p in sweep.CANDIDATES for p in cell["picks"])
        assert cell["best"] in sweep.CANDIDATES
        assert cell["wall_ratio"] > 0 and cell["step_ratio"] == pytest.approx(0.2)
        assert 0 <= cell["within"] <= cell["seeds"] and 0 <= cell["decisive"] <= 1
    everywhere = [c for c in cells if c["flexact"].startswith("everywhere")]
    assert everywhere and all(c["hidden"] for c in everywhere)  # backbone sites swapped


def test_sweep_judges_the_metric_per_task_mean_and_per_run() -> None:
    """One seed's miss pulls its task's mean outside the best's noise but costs one run only."""
    sweep = _load("sweep")
    variant = sweep.TASKS["synthetic-relu"].variants[0].name
    layer = [{"pick": "relu", "head": True, "top": 0.99, "committed_at": 0.5}]
    sweep_mse = {"relu": 0.0, "sigmoid": 8.5, "tanh": 8.7, "leaky_relu": 0.0014, "identity": 2.4}
    runs = [{"task": "synthetic-relu", "activation": a, "variant": None, "seed": seed,
             "metric": mse, "seconds": 1.0, "steps": 10, "layers": layer}
            for seed in (0, 1, 2) for a, mse in sweep_mse.items()]
    runs += [{"task": "synthetic-relu", "activation": None, "variant": variant, "seed": seed,
              "metric": mse, "seconds": 1.0, "steps": 10,
              "layers": [{**layer[0], "pick": pick}]}
             for seed, mse, pick in ((0, 0.0, "relu"), (1, 0.0, "relu"), (2, 0.0014, "leaky_relu"))]
    text, (cell,) = sweep.summarize(runs)
    assert cell["best"] == "relu" and cell["within"] == 2  # LeakyReLU is outside a std of 0
    assert not cell["metric_within"] and cell["metric_runs"] == 2
    assert "metric within the best's seed noise in 0/1 tasks (runs: 2/3)" in text


def test_sweep_members_of_the_head_only_sweep_keep_the_backbones_relu() -> None:
    from flexact.callbacks.selection_summary import named_layers

    sweep = _load("sweep")
    task = sweep.TASKS["teacher-d8-relu"]
    assert task.sweep_members() == [*sweep.CANDIDATES, *(f"head:{a}" for a in sweep.CANDIDATES)]
    assert sweep.TASKS["synthetic-tanh"].sweep_members() == sweep.CANDIDATES
    head_only = task.build("head:tanh", None)
    everywhere = task.build("tanh", None)
    assert [type(m).__name__ for m in head_only.model.backbone.modules()].count("ReLU") == 7
    assert "ReLU" not in [type(m).__name__ for m in everywhere.model.backbone.modules()]
    for module in (head_only, everywhere):
        assert [layer.candidate_names for name, layer in named_layers(module)
                if name.startswith("head")] == [("tanh",)]
    head_variant = next(v for v in sweep.HEAD_VARIANTS if "default" in v.name)
    every_variant = next(v for v in sweep.EVERYWHERE_VARIANTS if "default" in v.name)
    assert task.reference(head_variant) == "head:" and task.reference(every_variant) == ""
    assert sweep.TASKS["synthetic-tanh"].reference(head_variant) == ""


def test_longer_warmup_variants_change_only_the_warmup_of_the_everywhere_default() -> None:
    """The "(a longer warm-up)" rows: the everywhere default's selection, held for 40 % or 50 %."""
    sweep = _load("sweep")
    task = sweep.TASKS["teacher-d8-sigmoid"]
    default = sweep.EVERYWHERE_DEFAULT
    assert next(v for v in sweep.EVERYWHERE_VARIANTS if "(flexact's default)" in v.name) is default
    longer = [v for v in sweep.EVERYWHERE_VARIANTS if "(a longer warm-up)" in v.name]
    assert [v.select_after for v in longer] == [0.4, 0.5]
    base = task.build(None, default).selection
    for variant in longer:
        assert dataclasses.replace(variant, name=default.name, select_after=None) == default
        settings = task.build(None, variant).selection
        assert settings == dataclasses.replace(base, warmup=variant.select_after)
        assert settings.share and base.warmup == 0.3


def test_interleaving_keeps_every_run_once_and_runs_a_sweep_alone_without_variants() -> None:
    """Each seed's order holds every sweep member and variant once; ``--variants`` matching none
    of a task's variants leaves the sweep alone (it divided by zero before)."""
    sweep = _load("sweep")
    task = sweep.TASKS["teacher-d8-relu"]
    for seed in range(3):
        order = sweep.interleaved(task, seed)
        runs = [(a, None) for a in task.sweep_members()] + [(None, v) for v in task.variants]
        assert sorted(map(str, order)) == sorted(map(str, runs))
    alone = dataclasses.replace(task, variants=[])
    assert sweep.interleaved(alone, 1) == [
        (a, None) for a in task.sweep_members()[1:] + task.sweep_members()[:1]]


def _script(*args: str) -> str:
    import subprocess

    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=600, check=True)
    return result.stdout


@pytest.mark.slow
def test_probe_benchmark_smoke() -> None:
    """Tiny train + evaluate: every task and method gets a row; the real cache is untouched."""
    cache = REPO / "benchmarks" / "probe_cache.json"
    before = cache.stat().st_mtime if cache.exists() else None
    out = _script("benchmarks/probe.py", "smoke")
    for task in ("teacher_mlp", "digits_lenet", "digits_resnet"):
        for method in ("random", "output only", "fisher only", "both, no UMAP (default)"):
            assert f"| {task} | " in out and f"| {method} | " in out
    assert (cache.stat().st_mtime if cache.exists() else None) == before


def test_search_benchmark_smoke() -> None:
    """Every sampler runs against the exhaustive ground truth of a tiny space."""
    out = _script("benchmarks/search.py", "--smoke")
    assert "exhaustive best" in out
    for sampler in ("random", "tpe", "evolution", "surrogate", "tournament"):
        assert f"| {sampler} | " in out


def test_search_ground_truth_keeps_runs_per_seed_and_reads_old_caches(tmp_path: Path) -> None:
    """An old cache (one number per function) is its seed-0 run; missing seeds are trained."""
    import json

    search = _load("search")
    search.STEPS = 5
    space = search.SearchSpace("binary_unary", ["identity", "sin"], ["add"])
    path = tmp_path / "cache.json"
    names = space.functions() + search.BASELINES
    path.write_text(json.dumps({n: 123.0 for n in names}))
    runs = search.ground_truth(space, path, seeds=2)
    assert all(r[0] == 123.0 and len(r) == 2 for r in runs.values())
    assert runs["add(sin(x),x)"][1] == search.train_one("add(sin(x),x)", 1)  # seed 1 is a real run
    assert json.loads(path.read_text())["relu"] == runs["relu"]


def test_search_target_is_relative_or_the_best_means_noise() -> None:
    search = _load("search")
    truth = {"a": 1.0, "b": 2.0}
    runs = {"a": [0.5, 1.5], "b": [2.0, 2.0]}
    assert search.target_of(truth, runs, ["a", "b"], 0.05) == pytest.approx(1.05)
    # noise: the best's mean plus two standard errors (std 0.7071 over √2 runs)
    assert search.target_of(truth, runs, ["a", "b"], None) == pytest.approx(2.0)
    with pytest.raises(SystemExit, match="truth_seeds"):
        search.target_of(truth, {"a": [1.0], "b": [2.0]}, ["a", "b"], None)


def test_a_sweep_member_can_get_the_commits_warm_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--clear-member-state``: a sweep member's optimizer state cleared once, mid-run."""
    import lightning as L

    sweep = _load("sweep")
    ends: list[tuple[int, set[int]]] = []

    class Recording(sweep.ClearStateAt):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            optimizer = trainer.optimizers[0]
            ends.append((trainer.global_step, {int(optimizer.state[p]["step"])
                                               for p in optimizer.param_groups[0]["params"]}))

    monkeypatch.setattr(sweep, "ClearStateAt", Recording)
    task = sweep.TASKS["synthetic-tanh"]  # smoke data: 256 samples, batch 64, 4 steps an epoch
    sweep.fit_one(task, 0, 2, True, "tanh", None, 0.5)
    sweep.fit_one(task, 0, 2, True, None, sweep.HEAD_VARIANTS[0], 0.5)  # FlexAct: never
    assert ends == [(8, {8 - 4})]  # cleared before step 4: Adam counts the last 4 steps
