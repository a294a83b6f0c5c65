"""Tests for `inhernet_jax.experiment.report` on hand-made run records (no training, no JAX)."""

import json
import math
import os
import zlib

import hypothesis
import matplotlib.image as mpimg
import numpy as np
import pytest
from hypothesis import strategies as st

from inhernet_jax.experiment import report
from inhernet_jax.experiment.report import (
    epochs_to_reach,
    markdown_table,
    plot_curves,
    plot_rank_heads,
    summarize,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(method, seed, *, kind="student", loss="ce", params=1000, final=0.9,
             best=None, at_init=None, rank=None, heads=None, flops=2e6, wall=10.0,
             to_scratch=None, metric="accuracy", higher=True, epochs=4, label=None):
  """A run record whose history ends at ``final`` (a noisy rise towards it)."""
  rng = np.random.default_rng(zlib.crc32(f"{method}/{seed}".encode()))
  epoch = list(range(1, epochs + 1))
  test = [final - 0.05 * (epochs - e) + 0.01 * rng.standard_normal() for e in epoch]
  test[-1] = final
  return {
      "method": method, "label": label or method.replace("_", " "), "kind": kind,
      "loss": loss, "seed": seed, "rank": rank, "heads": heads, "params": params,
      "flops": flops, "metric_name": metric, "higher_is_better": higher,
      "metric_at_init": at_init, "final_metric": final,
      "best_metric": max(test) if best is None else best,
      "epochs_to_scratch": to_scratch, "wall_s": wall,
      "history": {
          "epoch": epoch, "train_loss": [2.0 / e for e in epoch],
          "train_metric": test, "test_loss": [2.5 / e for e in epoch],
          "test_metric": test, "lr": [1e-3] * epochs,
          "examples_per_s": [1000.0] * epochs,
      },
      "gates": None,
  }


def experiment(seeds=(0, 1, 2), sweep=False, metric="accuracy", higher=True):
  """Teacher, a scratch student, a KD student and InherNet (or a rank x heads sweep)."""
  runs = []
  for s in seeds:
    runs.append(make_run("teacher", s, kind="teacher", params=100_000, final=0.95 + 0.01 * s,
                         flops=3e7, metric=metric, higher=higher, epochs=6))
    runs.append(make_run("student_ce", s, params=10_000, final=0.80 + 0.01 * s,
                         metric=metric, higher=higher, to_scratch=4.0))
    runs.append(make_run("student_kd", s, loss="kd", params=10_000, final=0.82 + 0.02 * s,
                         metric=metric, higher=higher, to_scratch=None if s else 3.0))
    configs = [(r, h) for r in (4, 8) for h in (1, 3)] if sweep else [(8, 3)]
    for r, h in configs:
      runs.append(make_run(f"inhernet_kd_r{r}_h{h}", s, kind="inhernet", loss="kd",
                           rank=r, heads=h, params=1000 * r * h, final=0.85 + 0.01 * r / h,
                           at_init=0.5 + 0.01 * s, metric=metric, higher=higher,
                           to_scratch=2.0 + s))
  return runs


# ------------------------------------------------------------------ epochs_to_reach
HIST = {"epoch": [0, 1, 2, 3, 4], "test_metric": [0.3, 0.5, 0.7, 0.7, 0.9]}


@pytest.mark.parametrize("target, expected", [
    (0.3, 0.0),   # the epoch-0 (at-init) entry counts
    (0.1, 0.0),
    (0.6, 2.0),
    (0.7, 2.0),   # tie: reached at the first epoch equal to the target
    (0.9, 4.0),
    (0.91, None),
])
def test_epochs_to_reach_higher_is_better(target, expected):
  assert epochs_to_reach(HIST, target, True) == expected


BPC = {"epoch": [0, 1, 2, 3], "test_metric": [3.5, 2.0, 1.6, 1.6]}


@pytest.mark.parametrize("target, expected", [
    (3.5, 0.0), (4.0, 0.0), (1.9, 2.0), (1.6, 2.0), (2.0, 1.0), (1.59, None)])
def test_epochs_to_reach_lower_is_better(target, expected):
  assert epochs_to_reach(BPC, target, False) == expected


def test_epochs_to_reach_returns_float_epochs_and_skips_missing():
  history = {"epoch": [1, 2, 3], "test_metric": [None, float("nan"), 0.8]}
  result = epochs_to_reach(history, 0.0, True)
  assert result == 3.0 and isinstance(result, float)
  assert epochs_to_reach(history, float("nan"), True) is None
  assert epochs_to_reach({"epoch": [], "test_metric": []}, 0.5, True) is None
  with pytest.raises(ValueError, match="epochs"):
    epochs_to_reach({"epoch": [1, 2], "test_metric": [0.5]}, 0.5, True)


@hypothesis.given(
    metrics=st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=12),
    target=st.floats(0, 1, allow_nan=False),
    higher=st.booleans(),
    first_epoch=st.integers(0, 1),
)
def test_epochs_to_reach_is_the_first_epoch_meeting_target(metrics, target, higher,
                                                           first_epoch):
  epochs = list(range(first_epoch, first_epoch + len(metrics)))
  result = epochs_to_reach({"epoch": epochs, "test_metric": metrics}, target, higher)
  meets = [(m >= target) if higher else (m <= target) for m in metrics]
  if result is None:
    assert not any(meets)
  else:
    i = epochs.index(int(result))
    assert meets[i] and not any(meets[:i])


# ------------------------------------------------------------------------ summarize
def test_summarize_matches_numpy_over_three_seeds():
  runs = experiment()
  rows = summarize(runs)
  assert [r["method"] for r in rows] == [
      "teacher", "student_ce", "student_kd", "inhernet_kd_r8_h3"]
  by = {r["method"]: r for r in rows}
  for method, row in by.items():
    group = [r for r in runs if r["method"] == method]
    assert row["n_seeds"] == 3 and row["seeds"] == [0, 1, 2]
    assert row["params"] == group[0]["params"] and row["flops"] == group[0]["flops"]
    for key in ("final_metric", "best_metric", "wall_s"):
      values = np.array([r[key] for r in group])
      np.testing.assert_allclose(row[f"{key}_mean"], values.mean(), rtol=1e-12)
      np.testing.assert_allclose(row[f"{key}_std"], values.std(ddof=1), rtol=1e-12)
  inher = by["inhernet_kd_r8_h3"]
  assert (inher["rank"], inher["heads"], inher["kind"], inher["loss"]) == (8, 3, "inhernet",
                                                                          "kd")
  np.testing.assert_allclose(inher["metric_at_init_mean"], 0.51)
  np.testing.assert_allclose(inher["metric_at_init_std"], np.std([0.5, 0.51, 0.52], ddof=1))
  np.testing.assert_allclose(inher["epochs_to_scratch_mean"], 3.0)
  np.testing.assert_allclose(inher["epochs_to_scratch_std"], 1.0)
  assert inher["epochs_to_scratch_reached"] == 3
  # Reached by one seed of three: mean over that seed only, no spread.
  kd = by["student_kd"]
  assert (kd["epochs_to_scratch_mean"], kd["epochs_to_scratch_std"],
          kd["epochs_to_scratch_reached"]) == (3.0, None, 1)
  teacher = by["teacher"]
  assert teacher["metric_at_init_mean"] is None and teacher["metric_at_init_std"] is None
  assert teacher["epochs_to_scratch_reached"] == 0
  json.dumps(rows, allow_nan=False)  # Plain JSON, no NaN.


def test_summarize_one_seed_has_no_spread_and_nan_propagates():
  rows = summarize([make_run("a", 0, final=0.7), make_run("b", 0, final=float("nan")),
                    make_run("b", 1, final=0.6)])
  assert rows[0]["n_seeds"] == 1 and rows[0]["final_metric_mean"] == 0.7
  assert rows[0]["final_metric_std"] is None and rows[0]["wall_s_std"] is None
  assert math.isnan(rows[1]["final_metric_mean"])


def test_summarize_keeps_first_appearance_order_and_sorts_seeds():
  runs = [make_run("b", 2), make_run("a", 1), make_run("b", 0)]
  rows = summarize(runs)
  assert [r["method"] for r in rows] == ["b", "a"]
  assert rows[0]["seeds"] == [0, 2]


def test_summarize_rejects_mismatched_params_naming_the_method():
  runs = [make_run("inhernet_r8", 0, params=1000), make_run("inhernet_r8", 1, params=1001)]
  with pytest.raises(ValueError, match="inhernet_r8.*params"):
    summarize(runs)


def test_summarize_rejects_duplicate_seed():
  with pytest.raises(ValueError, match="duplicate seeds"):
    summarize([make_run("a", 0), make_run("a", 0)])


@hypothesis.given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=6))
def test_summarize_mean_lies_between_seed_extremes(finals):
  runs = [make_run("m", seed, final=f) for seed, f in enumerate(finals)]
  (row,) = summarize(runs)
  lo, hi = min(finals), max(finals)
  tol = 1e-9 * max(1.0, abs(lo), abs(hi))
  assert lo - tol <= row["final_metric_mean"] <= hi + tol
  if len(finals) == 1:
    assert row["final_metric_std"] is None
  else:
    np.testing.assert_allclose(row["final_metric_std"], np.std(finals, ddof=1),
                               rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- table
def table_rows(table):
  """Markdown table -> list of cell lists (header first, separator dropped)."""
  lines = table.strip().splitlines()
  assert set(lines[1]) <= set("|-: ")
  return [[c.strip() for c in line.strip("|").split(" | ")] for line in [lines[0]] +
          lines[2:]]


def test_markdown_table_accuracy_formatting():
  runs = [
      make_run("teacher", 0, kind="teacher", params=100_000, final=0.95, best=0.96,
               flops=2.5e9, wall=7200.0),
      make_run("student_ce", 0, params=25_000, final=0.81, best=0.82, flops=1.2e6,
               wall=30.0, to_scratch=4.0),
      make_run("student_ce", 1, params=25_000, final=0.83, best=0.84, flops=1.2e6,
               wall=90.0, to_scratch=5.0),
      make_run("inh", 0, kind="inhernet", params=12_340, final=0.9, best=0.91,
               at_init=0.5, flops=950.0, wall=120.0, to_scratch=1.0, label="InherNet r=8"),
      make_run("inh", 1, kind="inhernet", params=12_340, final=0.92, best=0.93,
               at_init=0.52, flops=950.0, wall=120.0, to_scratch=None, label="InherNet r=8"),
      make_run("kd", 0, params=25_000, final=0.8, flops=None, label="KD | T=4"),
  ]
  table = markdown_table(summarize(runs), "accuracy", True)
  header, teacher, scratch, inher, kd = table_rows(table)
  assert header == ["Method", "Seeds", "Params", "% of teacher", "FLOPs",
                    "Final accuracy (%) ↑", "Best accuracy (%) ↑", "At init accuracy (%) ↑",
                    "Epochs to scratch's final", "Wall time"]
  assert teacher == ["teacher", "1", "100,000", "100.0%", "2.5G", "95.00 ± —", "96.00",
                     "—", "—", "2.00 h"]
  assert scratch == ["student ce", "2", "25,000", "25.0%", "1.2M", "82.00 ± 1.41", "83.00",
                     "—", "4.5 (2/2)", "1.0 min"]
  assert inher == ["InherNet r=8", "2", "12,340", "12.3%", "950", "91.00 ± 1.41", "92.00",
                   "51.00", "1.0 (1/2)", "2.0 min"]
  assert kd[0] == "KD \\| T=4" and kd[4] == "—" and kd[8] == "never (0/1)"


def test_markdown_table_bpc_direction_and_no_teacher_column():
  runs = [make_run("lm", s, final=1.5 + 0.1 * s, best=1.4, metric="bpc", higher=False,
                   params=1_234_567, flops=3.4e12, wall=5.0) for s in range(3)]
  header, row = table_rows(markdown_table(summarize(runs), "bpc", False))
  assert "Final bpc ↓" in header and "% of teacher" not in header
  assert "↑" not in " ".join(header)
  # No row reached a scratch target (there is none): the column is a dash, not "never".
  assert row == ["lm", "3", "1,234,567", "3.4T", "1.600 ± 0.100", "1.400", "—", "—",
                 "5.0 s"]


# ------------------------------------------------------------------------- figures
def assert_png_with_content(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  image = mpimg.imread(path)
  assert image.ndim == 3 and min(image.shape[:2]) > 100
  assert float(np.var(image[..., :3])) > 1e-3


def test_plot_curves_writes_png(tmp_path):
  runs = experiment()
  # An InherNet epoch-0 entry with no train loss, and a seed killed one epoch early.
  for run in runs:
    if run["kind"] == "inhernet":
      h = run["history"]
      h["epoch"].insert(0, 0)
      h["test_metric"].insert(0, run["metric_at_init"])
      h["train_loss"].insert(0, None)
  short = runs[-1]["history"]
  for key in short:
    short[key] = short[key][:-1]
  path = tmp_path / "curves.png"
  plot_curves(runs, str(path))
  assert_png_with_content(path)
  assert os.listdir(tmp_path) == ["curves.png"]


def test_mean_curve_averages_the_seeds_present_at_each_epoch():
  a = {"history": {"epoch": [0, 1, 2], "test_metric": [0.2, 0.4, 0.6]}}
  b = {"history": {"epoch": [0, 1], "test_metric": [0.4, None]}}  # killed after epoch 1
  epochs, mean, std = report._mean_curve([a, b], "test_metric")
  np.testing.assert_array_equal(epochs, [0, 1, 2])
  np.testing.assert_allclose(mean, [0.3, 0.4, 0.6])
  np.testing.assert_allclose(std[0], np.std([0.2, 0.4], ddof=1))
  assert np.isnan(std[1:]).all()  # One seed: no band.


def test_plot_curves_one_seed_bpc(tmp_path):
  path = tmp_path / "c.png"
  plot_curves(experiment(seeds=(0,), metric="bpc", higher=False), str(path))
  assert_png_with_content(path)


def test_plot_curves_rejects_mixed_metrics(tmp_path):
  runs = [make_run("a", 0), make_run("b", 0, metric="bpc", higher=False)]
  with pytest.raises(ValueError, match="mix"):
    plot_curves(runs, str(tmp_path / "c.png"))


def test_plot_rank_heads_sweep(tmp_path):
  path = tmp_path / "rh.png"
  assert plot_rank_heads(summarize(experiment(sweep=True)), str(path), "accuracy") is True
  assert_png_with_content(path)


def test_plot_rank_heads_heads_only_sweep(tmp_path):
  # The paper's demo: rank 32, heads 1/2/3.
  runs = [make_run(f"inh_h{h}", 0, kind="inhernet", rank=32, heads=h, params=1000 * h,
                   final=0.8 + 0.01 * h) for h in (1, 2, 3)]
  path = tmp_path / "rh.png"
  assert plot_rank_heads(summarize(runs), str(path), "accuracy") is True
  assert_png_with_content(path)


def test_plot_rank_heads_without_sweep_writes_nothing(tmp_path):
  path = tmp_path / "rh.png"
  # One (rank, heads) point, even under two losses, is no sweep.
  runs = experiment() + [make_run("inhernet_ce_r8_h3", 0, kind="inhernet", rank=8, heads=3)]
  assert plot_rank_heads(summarize(runs), str(path), "accuracy") is False
  assert plot_rank_heads([], str(path), "accuracy") is False
  assert not path.exists() and os.listdir(tmp_path) == []


# -------------------------------------------------------------------------- report
def to_plain(obj):
  """What the input should look like after a JSON round trip."""
  if isinstance(obj, dict):
    return {str(k): to_plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple, np.ndarray)):
    return [to_plain(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def test_write_report_round_trips_and_leaves_no_temp_files(tmp_path):
  runs = experiment(sweep=True)
  runs[0]["final_metric"] = np.float32(0.95)    # NumPy values from a real run
  runs[0]["history"]["lr"] = np.full(6, 1e-3)
  runs[0]["params"] = np.int64(100_000)
  workdir = tmp_path / "out"
  paths = write_report(runs, str(workdir), title="Toy | sweep")
  assert set(paths) == {"json", "markdown", "curves", "rank_heads"}
  assert sorted(os.listdir(workdir)) == ["curves.png", "rank_heads.png", "results.json",
                                         "results.md"]
  with open(paths["json"]) as f:
    data = json.load(f)
  assert data["title"] == "Toy | sweep"
  assert data["runs"] == to_plain(runs)
  assert data["summary"] == summarize(data["runs"])
  md = open(paths["markdown"], encoding="utf-8").read()
  assert md.startswith("# Toy | sweep\n")
  assert "accuracy (higher is better)" in md and "3 seeds (0, 1, 2)" in md
  assert markdown_table(summarize(runs), "accuracy", True) in md
  assert_png_with_content(paths["curves"])
  assert_png_with_content(paths["rank_heads"])


def test_write_report_without_sweep_and_replaces_old_files(tmp_path):
  (tmp_path / "results.json").write_text("stale")
  paths = write_report(experiment(seeds=(3,)), str(tmp_path), title="t")
  assert "rank_heads" not in paths
  assert sorted(os.listdir(tmp_path)) == ["curves.png", "results.json", "results.md"]
  assert json.loads((tmp_path / "results.json").read_text())["summary"][0]["seeds"] == [3]


def test_write_report_bad_value_keeps_old_json(tmp_path):
  (tmp_path / "results.json").write_text('{"old": 1}')
  runs = experiment(seeds=(0,))
  runs[0]["gates"] = object()
  with pytest.raises(TypeError, match="gates"):
    write_report(runs, str(tmp_path), title="t")
  assert os.listdir(tmp_path) == ["results.json"]
  assert json.loads((tmp_path / "results.json").read_text()) == {"old": 1}


def test_gate_table_lists_each_gated_inhernet_layer_once():
  gates = {"conv": {"entropy": 0.5, "load": np.array([0.7, 0.2, 0.1]), "max_entropy": np.log(3)},
           "fc": {"entropy": 1.0, "load": np.array([0.3, 0.3, 0.4]), "max_entropy": np.log(3)}}
  runs = [{"method": "inherit", "label": "InherNet", "kind": "inhernet", "seed": s,
           "gates": gates} for s in (0, 1)]
  runs.append({"method": "student", "label": "S", "kind": "student", "seed": 0, "gates": None})
  text = report.gate_table(runs)
  assert text.count("**InherNet**") == 1 and "(seed 0)" in text
  assert "| conv | 0.500 / 1.099 (46%) | 0.70 0.20 0.10 |" in text
  assert "| fc | 1.000 / 1.099 (91%) |" in text
  assert report.gate_table(runs[2:]) == ""
