"""What ``flexact search`` writes: the leaderboard, the progress plot, the top expressions."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

__all__ = ["best_so_far", "leaderboard", "write_outputs"]


def leaderboard(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial, best first (finished trials by value, then the others)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        scores = t.user_attrs.get("scores", {})
        rows.append({
            "trial": t.number, "state": t.state.name, "sampler": t.user_attrs.get("sampler"),
            "expression": t.user_attrs.get("winner") or ";".join(t.user_attrs.get(
                "expressions", [])),
            "candidates": ";".join(t.user_attrs.get("expressions", [])),
            "id_metric": scores.get("id"), "ood_metric": scores.get("ood"),
            "value": t.values[0] if t.values else None,
            "steps": t.user_attrs.get("steps", 0),
            "reason": t.user_attrs.get("fail_reason") or (
                f"duplicate of {t.user_attrs['duplicate_of']} (not trained)"
                if "duplicate_of" in t.user_attrs else ""),
        })
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    rows.sort(key=lambda r: (r["state"] != "COMPLETE", sign * (r["value"] or 0.0), r["trial"]))
    return rows


def best_so_far(study: optuna.Study) -> dict[str, tuple[list[int], list[float]]]:
    """Per sampler: cumulative training steps and the best value found by then."""
    minimize = study.directions[0] == optuna.study.StudyDirection.MINIMIZE
    curves: dict[str, tuple[list[int], list[float]]] = {}
    spent: dict[str, int] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        name = t.user_attrs.get("sampler", "?")
        spent[name] = spent.get(name, 0) + int(t.user_attrs.get("steps", 0))
        if t.state != TrialState.COMPLETE or not t.values:
            continue
        steps, best = curves.setdefault(name, ([], []))
        value = t.values[0]
        if best:
            value = min(value, best[-1]) if minimize else max(value, best[-1])
        steps.append(spent[name])
        best.append(value)
    return curves


def _replace(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_outputs(study: optuna.Study, out: Path, top: int) -> list[dict[str, Any]]:
    """leaderboard.csv/json, progress.png and top.txt (``candidates_file:``) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = leaderboard(study)

    def write_csv(path: Path) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial"])
            writer.writeheader()
            writer.writerows(rows)

    _replace(out / "leaderboard.csv", write_csv)
    _replace(out / "leaderboard.json", lambda p: p.write_text(json.dumps(rows, indent=1)))
    best = list(dict.fromkeys(r["expression"] for r in rows if r["state"] == "COMPLETE"))
    _replace(out / "top.txt", lambda p: p.write_text(
        "# best expressions of study " + study.study_name + ", best first (candidates_file:)\n"
        + "".join(f"{e}\n" for e in best[:top])))
    _plot(study, out / "progress.png")
    print(f"{'trial':>5} {'state':<9} {'value':>10}  expression")
    for r in rows[:20]:
        value = "" if r["value"] is None or not math.isfinite(r["value"]) else f"{r['value']:.4g}"
        print(f"{r['trial']:>5} {r['state']:<9} {value:>10}  {r['expression']} {r['reason']}")
    print(f"wrote {out}/leaderboard.csv, leaderboard.json, progress.png, top.txt")
    return rows


def _plot(study: optuna.Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (steps, best) in best_so_far(study).items():
        ax.step(steps, best, where="post", label=name)
    ax.set(xlabel="training steps spent", ylabel="best value so far",
           title=f"study {study.study_name}")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
