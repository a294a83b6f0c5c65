"""A long benchmark as resumable pieces, and its combined report.

A *piece* is one config variant (the teacher, or one method at one seed) run into its own
directory ``<root>/<piece>/seed_<s>`` (the teacher: ``<root>/teacher``). `run_piece` skips
a piece whose ``results.json`` exists and otherwise runs it; a killed piece resumes from
its last checkpoint (the trainer's own resume), so the whole benchmark is started again
with the same command until every piece is done. `collect` reads every finished piece's
``results.json``; `combined_report` writes one ``results.json`` / ``results.md`` with mean
+- std over seeds, Welch's t-test of a chosen InherNet row against the best student, the
list of pieces still missing (the report says *partial* while any is), and the
compression curve (`curve_table`, `plot_curve`).

Example:
  ```python
  for name, seed in config_module.pieces():
    config = config_module.get_config(f"piece={name},seed={seed},root={root}")
    run_piece(config, piece_dir(root, name, seed))
  combined_report(root, out_dir, pieces=config_module.pieces(), title="...")
  ```
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from inhernet_jax.experiment import report
from inhernet_jax.experiment import runs as runs_lib
from inhernet_jax.training import lock as lock_lib

RESULTS = "results.json"


def piece_dir(root: str, name: str, seed: int) -> str:
  """Where a piece runs: ``<root>/teacher`` or ``<root>/<name>/seed_<seed>``."""
  return os.path.join(root, "teacher") if name == "teacher" else os.path.join(
      root, name, f"seed_{seed}")


def is_done(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, RESULTS))


def run_piece(config, directory: str) -> bool:
  """Runs one piece into ``directory`` unless it is done; True when it ran.

  The teacher piece (``config.piece == "teacher"``) trains (or resumes) the teacher
  under ``directory/seed_<seed>/teacher`` and reports it alone; any other piece is an
  ordinary experiment (`runs.train_and_evaluate`) whose teacher is
  ``config.teacher.checkpoint``.
  """
  if is_done(directory):
    return False
  if config.get("piece", "") != "teacher":
    runs_lib.train_and_evaluate(config, directory)
    return True
  os.makedirs(directory, exist_ok=True)
  with lock_lib.WorkdirLock(directory):
    pipeline = runs_lib.make_pipeline(config, config.seed, runs_lib.mesh_from_config(config))
    model, variables, run = runs_lib.load_or_train_teacher(
        config, pipeline, os.path.join(directory, f"seed_{config.seed}"), config.seed)
    record = runs_lib._teacher_record(config, model, variables, run, seed=config.seed,
                                      task=pipeline.task, flops={})
    report.write_report([record], directory, title=config.get("name", "teacher"))
  return True


def collect(root: str, pieces: Sequence[tuple[str, int]]) -> tuple[list[dict], list[str]]:
  """The run records of every finished piece, and the names of the missing ones."""
  runs, missing = [], []
  for name, seed in pieces:
    path = os.path.join(piece_dir(root, name, seed), RESULTS)
    if not os.path.exists(path):
      missing.append(f"{name} (seed {seed})")
      continue
    with open(path) as f:
      for r in json.load(f)["runs"]:
        r = dict(r, method=name if r["kind"] != "teacher" else "teacher")
        runs.append(r)
  return runs, missing


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, float] | None:
  """Welch's unequal-variance t-test of mean(a) - mean(b) (two-sided); None with fewer
  than two values on either side or zero variance on both."""
  from scipy import stats
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) < 2 or len(b) < 2 or (a.var(ddof=1) == 0 and b.var(ddof=1) == 0):
    return None
  t, p = stats.ttest_ind(a, b, equal_var=False)
  return {"diff": float(a.mean() - b.mean()), "t": float(t), "p": float(p),
          "n_a": int(len(a)), "n_b": int(len(b))}


def _finals(runs, method: str) -> list[float]:
  return [r["final_metric"] for r in runs if r["method"] == method
          and r.get("final_metric") is not None]


def compare(runs: Sequence[Mapping[str, Any]], candidate: str, students: Sequence[str]
            ) -> dict[str, Any] | None:
  """Welch's t-test of ``candidate`` against the student row of highest mean."""
  means = {s: float(np.mean(_finals(runs, s))) for s in students if _finals(runs, s)}
  if not means or not _finals(runs, candidate):
    return None
  best = max(means, key=means.get)
  test = welch(_finals(runs, candidate), _finals(runs, best))
  return {"candidate": candidate, "best_student": best, "test": test}


def curve_table(runs, points: Mapping[str, tuple[int, str]]) -> list[dict[str, Any]]:
  """The compression curve's rows: ``points`` maps a method key to (percent, series)."""
  out = []
  for key, (percent, series) in points.items():
    finals = _finals(runs, key)
    params = next((r["params"] for r in runs if r["method"] == key), None)
    out.append({"method": key, "percent": percent, "series": series, "params": params,
                "n": len(finals), "mean": float(np.mean(finals)) if finals else None,
                "std": float(np.std(finals, ddof=1)) if len(finals) > 1 else None})
  return out


def plot_curve(rows: Sequence[Mapping[str, Any]], path: str, teacher: float | None) -> None:
  """Final accuracy against parameters, one line per series (a PNG)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for series in dict.fromkeys(r["series"] for r in rows):
    pts = sorted((r["params"], 100 * r["mean"], 100 * (r["std"] or 0.0)) for r in rows
                 if r["series"] == series and r["mean"] is not None)
    if pts:
      x, y, e = zip(*pts)
      ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=series)
  if teacher is not None:
    ax.axhline(100 * teacher, color="grey", ls="--", label="teacher")
  ax.set_xscale("log")
  ax.set_xlabel("parameters")
  ax.set_ylabel("test accuracy (%)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _fmt(mean, std) -> str:
  if mean is None:
    return "not run yet"
  return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f} ± —"


def combined_report(root: str, out_dir: str, *, pieces: Sequence[tuple[str, int]], title: str,
                    students: Sequence[str], candidate: str, curve: Mapping[str, tuple[int, str]],
                    command: str) -> dict[str, Any]:
  """Writes ``results.json``, ``results.md`` and ``curve.png`` of the finished pieces into
  ``out_dir``; ``command`` (how to continue) goes into a partial report."""
  runs, missing = collect(root, pieces)
  os.makedirs(out_dir, exist_ok=True)
  summary = report.summarize(runs) if runs else []
  test = compare(runs, candidate, students)
  curve_rows = curve_table(runs, curve)
  teacher = next((r["final_metric"] for r in runs if r["kind"] == "teacher"), None)
  report.write_json(os.path.join(out_dir, RESULTS), {
      "title": title, "partial": bool(missing), "missing": missing, "runs": runs,
      "summary": summary, "welch": test, "curve": curve_rows})
  lines = [f"# {title}", ""]
  if missing:
    lines += [f"**PARTIAL**: {len(pieces) - len(missing)} of {len(pieces)} pieces finished; "
              f"missing: {', '.join(missing)}.", "", "Continue (skips finished pieces, resumes "
              "a killed one from its checkpoints):", "", "```bash", command, "```", ""]
  if summary:
    lines += [report.markdown_table(summary, runs[0]["metric_name"], True), ""]
  if test and test["test"]:
    t = test["test"]
    lines += [f"Welch's t-test, {candidate} vs the best student ({test['best_student']}): "
              f"difference {100 * t['diff']:+.2f} points, t = {t['t']:.2f}, p = {t['p']:.3g} "
              f"(n = {t['n_a']}, {t['n_b']}).", ""]
  else:
    lines += [f"Welch's t-test of {candidate} against the best student: not yet (needs two or "
              "more seeds of each).", ""]
  present = [r for r in curve_rows if r["mean"] is not None]
  lines += ["## Compression curve", "", "| size | series | params | accuracy (%) | seeds |",
            "|---|---|---|---|---|"]
  lines += [f"| {r['percent']}% | {r['series']} | {r['params'] if r['params'] else '—'} | "
            f"{_fmt(r['mean'], r['std'])} | {r['n']} |" for r in curve_rows]
  if present:
    plot_curve(curve_rows, os.path.join(out_dir, "curve.png"), teacher)
    lines += ["", "![compression curve](curve.png)"]
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return {"runs": runs, "missing": missing, "welch": test, "curve": curve_rows}


def finite(x) -> bool:
  return x is not None and math.isfinite(x)
