"""`inhernet_jax.experiment.loss_axis`, and curves.png's loss panel (`report.plot_curves`) using it."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from inhernet_jax.experiment import figures as figures_lib  # noqa: E402
from inhernet_jax.experiment import loss_axis
from inhernet_jax.experiment import report  # noqa: E402


@pytest.mark.parametrize("values, expected", [
    ([0.02, 0.5, 2.3], "log"),            # one CE curve falling 100x
    ([1.0, 2.0, 9.9], "linear"),          # under 10x
    ([0.0, 1.0, 100.0], "linear"),        # a zero: no log axis
    ([-1.0, 5.0], "linear"),
    ([np.nan, 0.1, np.inf, 5.0], "log"),  # non-finite values ignored
    ([], "linear"),
])
def test_scale(values, expected):
  assert loss_axis.scale(values) == expected


def test_apply_reads_the_plotted_lines():
  fig, ax = plt.subplots()
  ax.plot([0, 1], [0.05, 0.04])
  ax.set_ylabel("train loss")
  assert loss_axis.apply(ax) == "linear" and ax.get_yscale() == "linear"
  ax.plot([0, 1], [6.0, 5.0])  # DKD-like: 100x the CE curve
  assert loss_axis.apply(ax) == "log" and ax.get_yscale() == "log"
  assert ax.get_ylabel() == "train loss (log scale)"
  plt.close(fig)


def _run(method, kind, losses, seed=0):
  epochs = list(range(1, len(losses) + 1))
  return {"method": method, "label": method, "kind": kind, "seed": seed, "loss": "ce",
          "metric_name": "accuracy", "higher_is_better": True, "final_metric": 0.9,
          "history": {"epoch": epochs, "train_loss": losses,
                      "test_metric": [0.5 + 0.1 * e for e in epochs]}}


@pytest.mark.parametrize("dkd_scale, expected", [(100.0, "log"), (1.5, "linear")])
def test_curves_loss_panel(tmp_path, monkeypatch, dkd_scale, expected):
  figures = []
  real_save = figures_lib._save_figure  # report.plot_curves is figures.plot_curves.
  monkeypatch.setattr(figures_lib, "_save_figure", lambda fig, path: (
      figures.append([ax.get_yscale() for ax in fig.axes]), real_save(fig, path)))
  ce = [0.08, 0.07, 0.06]
  runs = [_run("student_ce", "student", ce), _run("student_dkd", "student",
                                                    [v * dkd_scale for v in ce])]
  report.plot_curves(runs, str(tmp_path / "curves.png"))
  (scales,) = figures
  assert scales[:2] == ["linear", expected]  # metric panel, loss panel
  assert (tmp_path / "curves.png").stat().st_size > 0
