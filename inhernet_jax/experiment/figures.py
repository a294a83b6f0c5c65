"""The experiment's figures: training curves (the paper's Figure 5) and the rank x heads
sweep (Figure 4), from run records (`records.RunRecord` or the equal dicts) and
`report.summarize` rows.

Pure NumPy + matplotlib with the ``Agg`` backend (nothing is ever shown); every PNG is
written atomically. `report.write_report` draws both; `report` re-exports them.

Example:
  ```python
  from inhernet_jax.experiment import figures, report

  figures.plot_curves(runs, "/tmp/exp/curves.png")
  figures.plot_rank_heads(report.summarize(runs), "/tmp/exp/rank_heads.png", "accuracy")
  ```
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Headless: report writing must never need a display.

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from inhernet_jax.common import utils  # noqa: E402
from inhernet_jax.experiment import loss_axis  # noqa: E402
from inhernet_jax.experiment.records import group_runs as _group  # noqa: E402
from inhernet_jax.experiment.records import is_fraction as _is_fraction  # noqa: E402
from inhernet_jax.experiment.records import is_missing as _is_missing  # noqa: E402
from inhernet_jax.experiment.records import mean_std as _mean_std  # noqa: E402
from inhernet_jax.experiment.records import metric_info as _metric_info  # noqa: E402

Run = Mapping[str, Any]  # A `records.RunRecord` or a dict in its layout.
Row = dict[str, Any]

_TEACHER_COLOR = "black"


def _scale(metric_name: str) -> float:
  return 100.0 if _is_fraction(metric_name) else 1.0


def _save_figure(fig: Any, path: str) -> None:
  try:
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120,
                                              bbox_inches="tight"))
  finally:
    plt.close(fig)


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

  Example:
    ```python
    plot_curves(runs, "/tmp/exp/curves.png")
    ```

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

  Example:
    ```python
    if not plot_rank_heads(summarize(runs), "/tmp/exp/rank_heads.png", "accuracy"):
      print("no (rank, heads) sweep")
    ```

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


__all__ = ["plot_curves", "plot_rank_heads"]
