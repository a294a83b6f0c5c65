"""Experiment reports: per-method summaries over seeds, a markdown table and figures.

An experiment produces one *run record* per ``(method, seed)``: a `records.RunRecord`
or a JSON-serialisable dict in its layout (every function here takes either):
``method`` (a key shared by the seeds of one method), ``label``, ``kind`` (``"teacher"``,
``"student"`` or ``"inhernet"``), ``loss``, ``seed``, ``rank`` / ``heads`` / ``init``
(``"svd"`` or ``"random"``; InherNet only, else ``None``), ``params``, ``flops`` (or ``None``), ``metric_name``,
``higher_is_better``, ``metric_at_init`` (InherNet right after `inherit`, else
``None``), ``final_metric``, ``best_metric``, ``epochs_to_scratch``, ``wall_s`` and a
per-epoch ``history`` dict of lists (``epoch``, ``train_loss``, ``train_metric``,
``test_loss``, ``test_metric``, ``lr``, ``examples_per_s``). This module only reads
them; the figures are `figures`' (re-exported here: `plot_curves`, `plot_rank_heads`).

Example:
  ```python
  from inhernet_jax.experiment import report

  scratch = runs_by_key[("student_ce", seed)]
  run["epochs_to_scratch"] = report.epochs_to_reach(
      run["history"], scratch["final_metric"], run["higher_is_better"])
  paths = report.write_report(runs, workdir, title="CIFAR-10: ResNet-18 -> InherNet")
  # {"json": .../results.json, "markdown": .../results.md, "curves": .../curves.png,
  #  "rank_heads": .../rank_heads.png (only for a (rank, heads) sweep)}
  ```

Conventions: spreads are the sample standard deviation (``ddof=1``) over seeds, and
``None`` when there is a single value (JSON has no NaN, and a one-seed spread of 0.0
would read as "perfectly reproducible"); tables render ``None`` as ``—``, and a NaN
(diverged seed) propagates into the mean and is shown as ``nan``. Accuracy-like
metrics (a name containing ``"acc"``) are fractions in the records and rendered as
percent with 2 decimals; any other metric (``bpc``, ...) is rendered as is with 3.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from inhernet_jax.experiment import figures
from inhernet_jax.common import utils
from inhernet_jax.experiment.figures import plot_curves, plot_rank_heads
from inhernet_jax.experiment.records import group_runs as _group
from inhernet_jax.experiment.records import is_fraction as _is_fraction
from inhernet_jax.experiment.records import is_missing as _is_missing
from inhernet_jax.experiment.records import mean_std as _mean_std
from inhernet_jax.experiment.records import metric_info as _metric_info

Run = Mapping[str, Any]  # A `records.RunRecord` or a dict in its layout.
Row = dict[str, Any]

# Per-seed scalars that `summarize` reduces to ``<key>_mean`` / ``<key>_std``.
_STAT_KEYS = ("final_metric", "best_metric", "metric_at_init", "wall_s")
_DASH = "—"
# Moved to `figures` (private: kept for code that reached in).
_mean_curve, _save_figure = figures._mean_curve, figures._save_figure


# ------------------------------------------------------------------------- helpers
def _fmt_metric(value: float | None, metric_name: str) -> str:
  if value is None:
    return _DASH
  if not math.isfinite(value):
    return str(value)  # "nan" / "inf": a diverged seed must be visible.
  if _is_fraction(metric_name):
    return f"{100.0 * value:.2f}"
  return f"{value:.3f}"


def _metric_header(metric_name: str, higher_is_better: bool) -> str:
  """E.g. ``accuracy (%) ↑`` or ``bpc ↓``: the unit and which way is better."""
  unit = " (%)" if _is_fraction(metric_name) else ""
  return f"{metric_name}{unit} {'↑' if higher_is_better else '↓'}"


def _fmt_flops(flops: float | None) -> str:
  if _is_missing(flops):
    return _DASH
  for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
    if abs(flops) >= scale:
      return f"{flops / scale:.3g}{unit}"
  return f"{flops:.3g}"


def _fmt_seconds(seconds: float | None) -> str:
  if _is_missing(seconds):
    return _DASH
  if seconds < 60:
    return f"{seconds:.1f} s"
  if seconds < 3600:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.2f} h"


def _fmt_percent_of(part: float, whole: float) -> str:
  share = 100.0 * part / whole
  return f"{share:.2f}%" if share < 1 else f"{share:.1f}%"


def _jsonable(obj: Any, where: str = "runs") -> Any:
  """Plain-Python copy of ``obj`` (`utils.jsonable`)."""
  return utils.jsonable(obj, where)


# ------------------------------------------------------------------------- metrics
def epochs_to_reach(
    history: Mapping[str, Sequence[Any]],
    target: float,
    higher_is_better: bool,
) -> float | None:
  """The first epoch whose test metric reaches ``target``.

  "Reaches" is ``>=`` when higher is better and ``<=`` otherwise, so a tie counts.
  Entries are scanned in the order of ``history["epoch"]``, including an epoch-0 entry
  (an inherited network evaluated before fine-tuning can already reach it). Missing
  metrics (``None``, NaN) never reach anything.

  Example:
    ```python
    epochs_to_reach({"epoch": [0, 1, 2], "test_metric": [0.5, 0.8, 0.9]}, 0.8, True)
    # -> 1.0
    ```

  Args:
    history: a run's ``history`` with equally long ``"epoch"`` and ``"test_metric"``.
    target: the metric to reach (typically the scratch student's final metric). A
      missing (``None`` / non-finite) target is never reached.
    higher_is_better: the metric's direction.

  Returns:
    That epoch as a float, or ``None`` if no epoch reaches ``target``.

  Raises:
    ValueError: if ``"epoch"`` and ``"test_metric"`` differ in length.
  """
  epochs, metrics = history["epoch"], history["test_metric"]
  if len(epochs) != len(metrics):
    raise ValueError(
        f"history has {len(epochs)} epochs but {len(metrics)} test_metric values")
  if _is_missing(target):
    return None
  target = float(target)
  for epoch, metric in zip(epochs, metrics):
    if _is_missing(metric):
      continue
    metric = float(metric)
    if (metric >= target) if higher_is_better else (metric <= target):
      return float(epoch)
  return None


def summarize(runs: Sequence[Run]) -> list[Row]:
  """One summary row per method, in the order methods first appear in ``runs``.

  Each row holds the method's ``method``, ``label``, ``kind``, ``loss``, ``rank``,
  ``heads``, ``params``, ``flops``, ``metric_name`` and ``higher_is_better`` (from its
  first seed), ``n_seeds`` and the sorted ``seeds``, and for each of ``final_metric``,
  ``best_metric``, ``metric_at_init`` and ``wall_s`` a ``<key>_mean`` and a sample
  ``<key>_std`` (``ddof=1``) over the seeds where it is not ``None``: ``None`` when no
  seed has it (mean) or fewer than two do (std); a NaN (diverged seed) propagates
  rather than being dropped. ``epochs_to_scratch_mean`` /
  ``_std`` run over the seeds that reached the scratch student's final metric and
  ``epochs_to_scratch_reached`` counts them (render as ``reached/n_seeds``).

  Args:
    runs: run records (see the module docstring).

  Returns:
    A list of JSON-serialisable dicts.

  Raises:
    ValueError: if a method's seeds disagree on ``params`` (or on non-missing
      ``flops``): they would not be the same model; or if a method repeats a seed.
  """
  rows = []
  for method, group in _group(runs).items():
    first = group[0]
    if len({r.get("params") for r in group}) != 1:
      per_seed = {r.get("seed"): r.get("params") for r in group}
      raise ValueError(f"method {method!r}: params differ across seeds: {per_seed}")
    flops = {float(r["flops"]) for r in group if not _is_missing(r.get("flops"))}
    if len(flops) > 1:
      raise ValueError(f"method {method!r}: flops differ across seeds: {sorted(flops)}")
    row: Row = {
        "method": method,
        "label": first.get("label", method),
        "kind": first.get("kind"),
        "loss": first.get("loss"),
        "init": first.get("init"),
        "rank": _jsonable(first.get("rank")),
        "heads": _jsonable(first.get("heads")),
        "params": _jsonable(first.get("params")),
        "flops": flops.pop() if flops else None,
        "metric_name": first.get("metric_name", "metric"),
        "higher_is_better": bool(first.get("higher_is_better", True)),
        "n_seeds": len(group),
        "seeds": [_jsonable(r.get("seed")) for r in group],
        "calibration_batches": _jsonable(first.get("calibration_batches")),
    }
    for key in _STAT_KEYS:
      mean, std, _ = _mean_std(r.get(key) for r in group)
      row[f"{key}_mean"], row[f"{key}_std"] = mean, std
    mean, std, reached = _mean_std(r.get("epochs_to_scratch") for r in group)
    row["epochs_to_scratch_mean"] = mean
    row["epochs_to_scratch_std"] = std
    row["epochs_to_scratch_reached"] = reached
    rows.append(row)
  return rows


# --------------------------------------------------------------------------- table
def _escape(text: Any) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Row], metric_name: str, higher_is_better: bool) -> str:
  """A GitHub markdown table of `summarize` rows.

  Columns: method label, number of seeds, params (thousands separators), params as a
  share of the first teacher row's (only if there is a teacher row), FLOPs (K/M/G/T,
  3 significant digits), final metric ``mean ± std``, best and at-init means, epochs
  to reach the scratch student's final metric (``mean (reached/n)``) and mean wall
  time. Accuracy-like metrics are percent with 2 decimals, others 3 decimals; missing
  values and one-seed spreads are ``—`` (so one seed reads ``97.00 ± —``). The epochs
  column is ``—`` for a teacher that never reached it, and for every row when no row
  reached it (no scratch run to compare with).

  Example:
    ```python
    print(markdown_table(summarize(runs), "accuracy", True))
    ```

  Args:
    rows: `summarize` output.
    metric_name: e.g. ``"accuracy"`` or ``"bpc"``; named in the header with its
      direction (``accuracy (%) ↑``, ``bpc ↓``).
    higher_is_better: the metric's direction.

  Returns:
    The table, lines joined by ``"\\n"``, with a trailing newline.
  """
  teacher = next((r for r in rows if r.get("kind") == "teacher"), None)
  teacher_params = teacher.get("params") if teacher else None
  show_share = bool(teacher_params)
  any_reached = any(r.get("epochs_to_scratch_reached", 0) for r in rows)
  metric = _metric_header(metric_name, higher_is_better)

  header = ["Method", "Seeds", "Params"]
  header += ["% of teacher"] if show_share else []
  header += ["FLOPs", f"Final {metric}", f"Best {metric}", f"At init {metric}",
             "Epochs to scratch's final", "Wall time"]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
  for row in rows:
    params = row.get("params")
    cells = [_escape(row.get("label", row.get("method"))), str(row.get("n_seeds", ""))]
    cells.append(_DASH if _is_missing(params) else f"{int(params):,}")
    if show_share:
      cells.append(_DASH if _is_missing(params) else _fmt_percent_of(params, teacher_params))
    cells.append(_fmt_flops(row.get("flops")))
    mean, std = row.get("final_metric_mean"), row.get("final_metric_std")
    cells.append(f"{_fmt_metric(mean, metric_name)} ± {_fmt_metric(std, metric_name)}"
                 if mean is not None else _DASH)
    cells.append(_fmt_metric(row.get("best_metric_mean"), metric_name))
    cells.append(_fmt_metric(row.get("metric_at_init_mean"), metric_name))
    reached = row.get("epochs_to_scratch_reached", 0)
    if reached:
      cells.append(f"{row['epochs_to_scratch_mean']:.1f} ({reached}/{row['n_seeds']})")
    elif any_reached and row.get("kind") != "teacher":
      cells.append(f"never (0/{row['n_seeds']})")
    else:
      cells.append(_DASH)
    cells.append(_fmt_seconds(row.get("wall_s_mean")))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------- report
def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON atomically (NumPy values become plain Python)."""
  utils.write_json(path, obj, indent=1)


def gate_table(runs: Sequence[Run]) -> str:
  """InherNet's gates per layer at the end of training: entropy and head load.

  One table per gated InherNet method (its first seed): per layer the mean gate
  entropy against its maximum log(H) (uniform gates) and the mean weight of each head.
  An entropy near log(H) with equal loads means the heads are used as one averaged
  head; low entropy means per-input routing. Empty when no run has gates.
  """
  seen, blocks = set(), []
  for r in runs:
    gates = r.get("gates")
    if r.get("kind") != "inhernet" or not gates or r["method"] in seen:
      continue
    seen.add(r["method"])
    lines = [f"**{_escape(r.get('label', r['method']))}** (seed {r.get('seed')})", "",
             "| Layer | Entropy / log H | Head load |", "|---|---:|---|"]
    for path, g in gates.items():
      load = np.asarray(g["load"], dtype=float).ravel()
      ratio = float(g["entropy"]) / float(g["max_entropy"]) if g.get("max_entropy") else float("nan")
      lines.append(f"| {_escape(path)} | {float(g['entropy']):.3f} / {float(g['max_entropy']):.3f}"
                   f" ({ratio:.0%}) | {' '.join(f'{x:.2f}' for x in load)} |")
    blocks.append("\n".join(lines))
  return "\n\n".join(blocks)


def write_report(runs: Sequence[Run], workdir: str, *, title: str) -> dict[str, str]:
  """Writes the experiment's results into ``workdir`` (created if missing).

  * ``results.json``: ``{"title", "runs", "summary"}``; NumPy values become plain
    Python ones (non-finite floats are written as Python's ``NaN`` / ``Infinity``
    tokens, which `json.load` reads back).
  * ``results.md``: the title, a line on the metric's direction and the seeds, the
    `markdown_table`, links to the figures, and InherNet's `gate_table`.
  * ``curves.png`` (`plot_curves`) and, for a (rank, heads) sweep, ``rank_heads.png``
    (`plot_rank_heads`).

  Every file is written to a temp file and moved into place with `os.replace`, so a
  killed run leaves either the old file or the new one. Call it on one process only.

  Example:
    ```python
    paths = write_report(runs, "/tmp/exp", title="digits: CNN -> InherNet")
    ```

  Args:
    runs: run records (see the module docstring), all of one metric.
    workdir: the output directory.
    title: the report's title.

  Returns:
    The paths written, keyed ``"json"``, ``"markdown"``, ``"curves"`` and, when
    written, ``"rank_heads"``.

  Raises:
    ValueError: if ``runs`` is empty, mixes metrics, or `summarize` rejects it.
    TypeError: if a run holds a value JSON cannot represent.
  """
  runs = [r if isinstance(r, dict) else dict(r) for r in runs]  # RunRecords: their layout.
  metric_name, higher_is_better = _metric_info(runs)
  rows = summarize(runs)
  # Serialise before touching the disk: a bad value must not cost the old report.
  payload = json.dumps({"title": title, "runs": _jsonable(list(runs)), "summary": rows},
                       indent=1, ensure_ascii=False).encode("utf-8")
  os.makedirs(workdir, exist_ok=True)
  paths = {"json": os.path.join(workdir, "results.json"),
           "markdown": os.path.join(workdir, "results.md"),
           "curves": os.path.join(workdir, "curves.png")}
  utils.atomic_write(paths["json"], lambda f: f.write(payload))

  plot_curves(runs, paths["curves"])
  rank_heads = os.path.join(workdir, "rank_heads.png")
  if plot_rank_heads(rows, rank_heads, metric_name):
    paths["rank_heads"] = rank_heads

  seeds = sorted({s for r in rows for s in r["seeds"]}, key=lambda s: (s is None, s))
  counts = sorted({r["n_seeds"] for r in rows})
  per_row = "" if len(counts) == 1 else " (some methods have fewer; see Seeds)"
  direction = "higher" if higher_is_better else "lower"
  lines = [
      f"# {title}", "",
      f"Metric: {metric_name} ({direction} is better); mean ± sample std (ddof=1) over "
      f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
      f"({', '.join(map(str, seeds))}){per_row}. {_DASH} = not applicable, or no spread "
      "from a single seed.", "",
      markdown_table(rows, metric_name, higher_is_better),
      "![curves](curves.png)",
  ]
  if "rank_heads" in paths:
    lines += ["", "![rank x heads](rank_heads.png)"]
  gates = gate_table(runs)
  if gates:
    lines += ["", "## Gates at the end of training", "", gates]
  text = "\n".join(lines) + "\n"
  utils.atomic_write(paths["markdown"], lambda f: f.write(text.encode("utf-8")))
  return paths
