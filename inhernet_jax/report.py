"""Experiment reports: per-method summaries over seeds, a markdown table and figures.

An experiment produces one *run record* (a JSON-serialisable dict) per ``(method, seed)``:
``method`` (a key shared by the seeds of one method), ``label``, ``kind`` (``"teacher"``,
``"student"`` or ``"inhernet"``), ``loss``, ``seed``, ``rank`` / ``heads`` / ``init``
(``"svd"`` or ``"random"``; InherNet only, else ``None``), ``params``, ``flops`` (or ``None``), ``metric_name``,
``higher_is_better``, ``metric_at_init`` (InherNet right after `inherit`, else
``None``), ``final_metric``, ``best_metric``, ``epochs_to_scratch``, ``wall_s`` and a
per-epoch ``history`` dict of lists (``epoch``, ``train_loss``, ``train_metric``,
``test_loss``, ``test_metric``, ``lr``, ``examples_per_s``). This module only reads
them; it is pure NumPy + matplotlib (``Agg`` backend, nothing is ever shown).

Example::

  from inhernet_jax import report

  scratch = runs_by_key[("student_ce", seed)]
  run["epochs_to_scratch"] = report.epochs_to_reach(
      run["history"], scratch["final_metric"], run["higher_is_better"])
  paths = report.write_report(runs, workdir, title="CIFAR-10: ResNet-18 -> InherNet")
  # {"json": .../results.json, "markdown": .../results.md, "curves": .../curves.png,
  #  "rank_heads": .../rank_heads.png (only for a (rank, heads) sweep)}

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
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Headless: report writing must never need a display.

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from inhernet_jax import files  # noqa: E402
from inhernet_jax import loss_axis  # noqa: E402
from inhernet_jax import utils  # noqa: E402

Run = Mapping[str, Any]
Row = dict[str, Any]

# Per-seed scalars that `summarize` reduces to ``<key>_mean`` / ``<key>_std``.
_STAT_KEYS = ("final_metric", "best_metric", "metric_at_init", "wall_s")
_DASH = "—"
_TEACHER_COLOR = "black"


# ------------------------------------------------------------------------- helpers
def _is_missing(value: Any) -> bool:
  """``None`` or a non-finite float: a value that did not happen (or diverged)."""
  if value is None:
    return True
  try:
    return not math.isfinite(float(value))
  except (TypeError, ValueError):
    return True


def _mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
  """Mean, sample std (``ddof=1``) and count of the non-``None`` values.

  ``None`` (a method without an at-init metric, a seed that never reached a target) is
  dropped; NaN is kept and propagates, so a diverged seed shows instead of vanishing.
  """
  kept = np.asarray([float(v) for v in values if v is not None], np.float64)
  if kept.size == 0:
    return None, None, 0
  std = float(np.std(kept, ddof=1)) if kept.size > 1 else None
  return float(np.mean(kept)), std, int(kept.size)


def _group(runs: Sequence[Run]) -> dict[str, list[Run]]:
  """Runs by method, methods in order of first appearance, seeds sorted."""
  groups: dict[str, list[Run]] = {}
  for run in runs:
    groups.setdefault(run["method"], []).append(run)
  for method, group in groups.items():
    seeds = [r.get("seed") for r in group]
    if len(set(seeds)) != len(seeds):
      raise ValueError(f"method {method!r} has duplicate seeds {seeds}")
    group.sort(key=lambda r: (r.get("seed") is None, r.get("seed")))
  return groups


def _metric_info(runs: Sequence[Run]) -> tuple[str, bool]:
  """The experiment's single ``(metric_name, higher_is_better)``."""
  if not runs:
    raise ValueError("no runs")
  infos = {(r.get("metric_name", "metric"), bool(r.get("higher_is_better", True)))
           for r in runs}
  if len(infos) != 1:
    raise ValueError(f"runs mix metrics {sorted(infos)}; one report per metric")
  return next(iter(infos))


def _is_fraction(metric_name: str) -> bool:
  return "acc" in metric_name.lower()


def _scale(metric_name: str) -> float:
  return 100.0 if _is_fraction(metric_name) else 1.0


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


def _save_figure(fig: Any, path: str) -> None:
  try:
    files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120,
                                              bbox_inches="tight"))
  finally:
    plt.close(fig)


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

  Example::

    epochs_to_reach({"epoch": [0, 1, 2], "test_metric": [0.5, 0.8, 0.9]}, 0.8, True)
    # -> 1.0

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

  Example::

    print(markdown_table(summarize(runs), "accuracy", True))

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


# ------------------------------------------------------------------------- figures
def _mean_curve(group: Sequence[Run], key: str) -> tuple[np.ndarray, ...]:
  """Per-epoch mean and std of ``history[key]`` over seeds (epochs may differ).

  Each epoch averages the seeds that logged a value there (a killed seed shortens only
  its own tail); the std is NaN where fewer than two seeds did, so no band is drawn.
  """
  values: dict[float, list[float]] = {}
  for run in group:
    history = run.get("history") or {}
    for epoch, value in zip(history.get("epoch", []), history.get(key, []) or []):
      if not _is_missing(value) and not _is_missing(epoch):
        values.setdefault(float(epoch), []).append(float(value))
  epochs = np.asarray(sorted(values), np.float64)
  mean = np.asarray([np.mean(values[e]) for e in epochs], np.float64)
  std = np.asarray([np.std(values[e], ddof=1) if len(values[e]) > 1 else np.nan
                    for e in epochs], np.float64)
  return epochs, mean, std


_LINESTYLE = {"inhernet": "-", "student": "--"}


def plot_curves(runs: Sequence[Run], path: str) -> None:
  """Figure-5-style training curves: test metric and train loss vs epoch.

  Every non-teacher method is a line (mean over its seeds) with a shaded ±std band
  where several seeds logged the epoch; InherNet lines are solid, students dashed.
  The teacher, trained on its own schedule, is a black dashed horizontal line at its
  mean final metric in the metric panel and is left out of the loss panel. Accuracy
  is plotted in percent.

  Example::

    plot_curves(runs, "/tmp/exp/curves.png")

  Args:
    runs: run records with ``history`` (all of one metric).
    path: the PNG to write (atomically).

  Raises:
    ValueError: if ``runs`` is empty or mixes metrics.
  """
  metric_name, higher_is_better = _metric_info(runs)
  scale = _scale(metric_name)
  groups = _group(list(runs))
  fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(13, 5))
  colors = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")
  n_seeds = max(len(g) for g in groups.values())
  for i, (method, group) in enumerate(groups.items()):
    label = group[0].get("label", method)
    if group[0].get("kind") == "teacher":
      final, _, _ = _mean_std(r.get("final_metric") for r in group)
      if final is not None and math.isfinite(final):
        ax_metric.axhline(scale * final, color=_TEACHER_COLOR, ls="--", lw=1.5,
                          label=f"{label} (final)")
      continue
    color = colors(i % colors.N)
    style = _LINESTYLE.get(group[0].get("kind"), "-.")
    for ax, key, factor in ((ax_metric, "test_metric", scale), (ax_loss, "train_loss", 1.0)):
      epochs, mean, std = _mean_curve(group, key)
      if epochs.size == 0:
        continue
      ax.plot(epochs, factor * mean, color=color, ls=style, lw=1.6, marker=None,
              label=label if ax is ax_metric else None)
      band = ~np.isnan(std)
      if band.any():
        ax.fill_between(epochs[band], factor * (mean - std)[band],
                        factor * (mean + std)[band], color=color, alpha=0.2, lw=0)
  unit = " (%)" if _is_fraction(metric_name) else ""
  ax_metric.set(xlabel="epoch",
                ylabel=f"test {metric_name}{unit} ({'higher' if higher_is_better else 'lower'}"
                       " is better)")
  ax_loss.set(xlabel="epoch", ylabel="train loss")
  loss_axis.apply(ax_loss)  # Log scale when the methods' losses span > 10x (CE vs DKD).
  for ax in (ax_metric, ax_loss):
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  spread = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "1 seed"
  fig.suptitle(f"Test {metric_name} and train loss vs epoch ({spread})")
  handles, labels = ax_metric.get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(handles)),
               bbox_to_anchor=(0.5, -0.02 - 0.045 * math.ceil(len(handles) / 4)),
               frameon=False, fontsize="small")
  fig.tight_layout()
  _save_figure(fig, path)


def plot_rank_heads(rows: Sequence[Row], path: str, metric_name: str) -> bool:
  """Figure-4-style sweep plot: metric over rank x heads, and metric vs params.

  One heatmap per InherNet loss (``ce``, ``kd``, ...) whose rows span at least two
  ranks or two head counts (the paper's demo sweeps heads at a fixed rank), each cell
  the mean final metric, annotated, brighter = better; a cell with no run is blank,
  and if two methods share a (loss, rank, heads) the first wins (with a warning). The
  last panel scatters mean final metric against params for every InherNet row
  (annotated ``r/H``) and for the students and teacher (labelled points).

  Example::

    if not plot_rank_heads(summarize(runs), "/tmp/exp/rank_heads.png", "accuracy"):
      print("no (rank, heads) sweep")

  Args:
    rows: `summarize` output.
    path: the PNG to write (atomically).
    metric_name: the metric's name (accuracy-like metrics are shown in percent).

  Returns:
    True if the figure was written; False (nothing written) if no InherNet loss has
    two distinct ranks or two distinct head counts.
  """
  inher = [r for r in rows if r.get("kind") == "inhernet"
           and r.get("rank") is not None and r.get("heads") is not None
           and not _is_missing(r.get("final_metric_mean"))]
  by_loss: dict[Any, dict[tuple[Any, Any], Row]] = {}
  for row in inher:
    # One panel per fine-tuning loss; a random-init ablation is a panel of its own.
    group = row.get("loss") if row.get("init") in (None, "svd") else f"{row.get('loss')}, {row['init']} init"
    cells = by_loss.setdefault(group, {})
    key = (row["rank"], row["heads"])
    if key in cells:
      warnings.warn(f"plot_rank_heads: {row['method']!r} repeats (loss={row.get('loss')}, "
                    f"rank, heads)={key} of {cells[key]['method']!r}; keeping the first")
      continue
    cells[key] = row
  sweeps = {loss: cells for loss, cells in by_loss.items()
            if len({k[0] for k in cells}) > 1 or len({k[1] for k in cells}) > 1}
  if not sweeps:
    return False

  higher_is_better = bool(inher[0].get("higher_is_better", True))
  scale = _scale(metric_name)
  cmap = "viridis" if higher_is_better else "viridis_r"
  fig, axes = plt.subplots(1, len(sweeps) + 1, figsize=(5.5 * (len(sweeps) + 1), 4.8),
                           squeeze=False)
  axes = axes[0]
  for ax, (loss, cells) in zip(axes, sweeps.items()):
    ranks = sorted({k[0] for k in cells})
    heads = sorted({k[1] for k in cells})
    grid = np.full((len(ranks), len(heads)), np.nan)
    for (rank, head), row in cells.items():
      grid[ranks.index(rank), heads.index(head)] = scale * row["final_metric_mean"]
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2
    for (i, j), value in np.ndenumerate(grid):
      if np.isfinite(value):
        # Dark text on the bright half of viridis, light text on the dark half.
        bright = (value > middle) == higher_is_better
        ax.text(j, i, f"{value:.2f}" if scale != 1 else f"{value:.3f}", ha="center",
                va="center", color="black" if bright else "white", fontsize=9)
    ax.set_xticks(range(len(heads)), [str(h) for h in heads])
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set(xlabel="heads H", ylabel="rank r", title=f"InherNet ({loss}): final {metric_name}")

  ax = axes[-1]
  markers = iter("osD^vP*X")
  for loss, cells in by_loss.items():
    pts = sorted(cells.values(), key=lambda r: r["params"])
    ax.scatter([r["params"] for r in pts], [scale * r["final_metric_mean"] for r in pts],
               marker=next(markers, "o"), label=f"InherNet ({loss})", zorder=3)
    for r in pts:
      ax.annotate(f"r{r['rank']}/H{r['heads']}",
                  (r["params"], scale * r["final_metric_mean"]),
                  textcoords="offset points", xytext=(4, 3), fontsize=7)
  for row in rows:
    if row.get("kind") in ("teacher", "student") and not _is_missing(
        row.get("final_metric_mean")) and not _is_missing(row.get("params")):
      teacher = row["kind"] == "teacher"
      point = (row["params"], scale * row["final_metric_mean"])
      ax.scatter(*point, marker="*" if teacher else "x", s=120 if teacher else 50,
                 color=_TEACHER_COLOR if teacher else "tab:red", zorder=4)
      ax.annotate(str(row.get("label", row.get("method"))), point,
                  textcoords="offset points", xytext=(4, -10), fontsize=7)
  params = [r["params"] for r in rows if not _is_missing(r.get("params"))
            and r["params"] > 0]
  if params and max(params) / min(params) > 20:
    ax.set_xscale("log")
  ax.margins(x=0.12, y=0.08)  # Room for the point labels at the edges.
  unit = " (%)" if _is_fraction(metric_name) else ""
  arrow = "↑" if higher_is_better else "↓"
  ax.set(xlabel="parameters", ylabel=f"final {metric_name}{unit} {arrow}",
         title=f"{metric_name} vs parameters")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  _save_figure(fig, path)
  return True


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

  Example::

    paths = write_report(runs, "/tmp/exp", title="digits: CNN -> InherNet")

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
  metric_name, higher_is_better = _metric_info(runs)
  rows = summarize(runs)
  # Serialise before touching the disk: a bad value must not cost the old report.
  payload = json.dumps({"title": title, "runs": _jsonable(list(runs)), "summary": rows},
                       indent=1, ensure_ascii=False).encode("utf-8")
  os.makedirs(workdir, exist_ok=True)
  paths = {"json": os.path.join(workdir, "results.json"),
           "markdown": os.path.join(workdir, "results.md"),
           "curves": os.path.join(workdir, "curves.png")}
  files.atomic_write(paths["json"], lambda f: f.write(payload))

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
  files.atomic_write(paths["markdown"], lambda f: f.write(text.encode("utf-8")))
  return paths
