"""The experiment end to end on the local variants: digits (images) and chars (LM)."""

import importlib.util
import json
import pathlib
import shutil

import ml_collections
import numpy as np
import pytest

from inhernet_jax.experiment import runs as experiment
from inhernet_jax.experiment.records import MethodDef

ROOT = pathlib.Path(__file__).parents[1]


def _config(name: str, arg: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
  """The local digits teacher, trained once for the tests that run on it unchanged."""
  config = _config("digits", "local")
  workdir = tmp_path_factory.mktemp("digits_teacher") / f"seed_{config.seed}"
  pipeline = experiment.make_pipeline(config, config.seed, experiment.mesh_from_config(config))
  experiment.load_or_train_teacher(config, pipeline, str(workdir), config.seed)
  return workdir / "teacher"


def _with_teacher(teacher, workdir):
  """``workdir`` holding a finished copy of ``teacher``'s run (restored, not retrained)."""
  shutil.copytree(teacher, workdir / "seed_0" / "teacher", ignore=shutil.ignore_patterns(".lock"))
  return str(workdir)


def _by_method(runs):
  out = {}
  for r in runs:
    out.setdefault(r["method"], []).append(r)
  return out


@pytest.mark.slow
def test_digits_two_seeds_every_method(digits_teacher, tmp_path):
  config = _config("digits", "local")
  config.seeds = 2
  results = experiment.train_and_evaluate(config, _with_teacher(digits_teacher, tmp_path))
  runs = _by_method(results["runs"])
  assert list(runs) == ["teacher", "student", "student_kd", "student_dkd", "student_fitnet",
                        "inherit", "inherit_kd", "inherit_random"]
  assert len(runs["teacher"]) == 1  # One shared teacher, reported once.
  assert all(len(v) == 2 for k, v in runs.items() if k != "teacher")
  student = runs["student"][0]
  teacher = runs["teacher"][0]
  # Same architecture and size; only the initialisation differs.
  assert runs["inherit_random"][0]["params"] == runs["inherit"][0]["params"]
  for a, b in zip(runs["inherit"], runs["inherit_random"]):
    assert a["metric_at_init"] > b["metric_at_init"] + 0.1  # The teacher's knowledge.
  for name in ("inherit", "inherit_kd", "inherit_random"):
    for r in runs[name]:
      # The comparison: InherNet at no more parameters than the student.
      assert r["params"] <= student["params"] < teacher["params"]
      assert r["rank"] >= 1 and r["heads"] == 3
      assert r["metric_at_init"] == r["history"]["test_metric"][0]
      assert r["gates"], name
  for r in results["runs"]:
    h = r["history"]
    assert len(h["epoch"]) == (4 if r["kind"] == "teacher" else 3)
    assert r["final_metric"] == h["test_metric"][-1]
    assert r["best_metric"] == max(h["test_metric"])
    if r["kind"] != "teacher" and r["epochs_to_scratch"] is not None:
      scratch = next(s for s in runs["student"] if s["seed"] == r["seed"])
      first = r["epochs_to_scratch"]
      assert h["test_metric"][h["epoch"].index(first)] >= scratch["final_metric"]
  # Students with the same init seed but different losses really differ.
  assert runs["student"][0]["final_metric"] != runs["student_dkd"][0]["final_metric"] or \
      runs["student"][0]["history"]["train_loss"] != runs["student_dkd"][0]["history"]["train_loss"]
  saved = json.loads((tmp_path / "results.json").read_text())
  assert [r["method"] for r in saved["runs"]] == [r["method"] for r in results["runs"]]
  assert {row["method"]: row["n_seeds"] for row in saved["summary"]}["inherit"] == 2
  text = (tmp_path / "results.md").read_text()
  for r in results["runs"]:
    assert r["label"] in text
  assert (tmp_path / "curves.png").stat().st_size > 1000
  assert not (tmp_path / "rank_heads.png").exists()


@pytest.mark.slow
def test_digits_sweep_writes_rank_heads_plot(digits_teacher, tmp_path):
  config = _config("digits", "local")
  config.methods = "inherit"
  config.scratch_method = "none"
  config.sweep = ml_collections.ConfigDict({"ranks": (2, 4), "heads": (1, 2)})
  config.epochs = 1
  results = experiment.train_and_evaluate(config, _with_teacher(digits_teacher, tmp_path))
  keys = [r["method"] for r in results["runs"]]
  assert keys == ["teacher", "inherit_r2_h1", "inherit_r2_h2", "inherit_r4_h1", "inherit_r4_h2"]
  params = {r["method"]: r["params"] for r in results["runs"]}
  assert params["inherit_r2_h1"] < params["inherit_r2_h2"] < params["inherit_r4_h2"]
  assert (tmp_path / "rank_heads.png").exists()


@pytest.mark.slow
def test_chars_lm_every_method(tmp_path):
  config = _config("chars", "local")
  results = experiment.train_and_evaluate(config, str(tmp_path))
  runs = _by_method(results["runs"])
  assert set(runs) == {"teacher", "student", "student_kd", "student_fitnet", "inherit",
                       "inherit_kd"}
  for r in results["runs"]:
    assert r["metric_name"] == "bpc" and not r["higher_is_better"]
    assert 0.0 < r["final_metric"] < 7.0 + 1e-6  # log2(128) = 7 bits: uniform guessing.
    assert np.isfinite(r["history"]["train_loss"][-1])
  # The teacher learned something (an untrained LM is near 7 bits per character).
  assert runs["teacher"][0]["final_metric"] < 6.0
  assert runs["inherit"][0]["params"] <= runs["student"][0]["params"]
  assert "bpc" in (tmp_path / "results.md").read_text()


def test_bad_method_configs_name_the_field():
  config = _config("digits", "local")
  config.methods = "student,nope"
  with pytest.raises(ValueError, match="nope"):
    experiment.expand_methods(config)
  config = _config("digits", "local")
  config.method_defs.inherit.kind = "distill"
  with pytest.raises(ValueError, match="method_defs.inherit.kind"):
    experiment.expand_methods(config)


def test_named_ranks_mean_what_they_mean_on_the_command_line():
  """A config's rank 'student:<zoo model>' is that zoo model's size at the task's classes
  (as for --rank / --budget); 'params:<method>' is a method run before it."""
  from inhernet_jax import models
  size = experiment._student_size("student:resnet8", {}, "inherit", num_classes=10)
  assert size == models.param_count("resnet8", num_classes=10)
  assert size != models.param_count("resnet8", num_classes=100)
  assert experiment._student_size("params:student", {"student": 1234}, "inherit") == 1234
  assert experiment._student_size(8, {"student": 1234}, "inherit") is None
  with pytest.raises(ValueError, match=r"method_defs\.inherit\.rank 'params:kd'.*known: student"):
    experiment._student_size("params:kd", {"student": 1234}, "inherit")


@pytest.mark.slow
def test_digits_data_aware_and_budget_matched_methods(digits_teacher, tmp_path):
  config = _config("digits", "local")
  config.methods = "student,inherit_aware,inherit_greedy"
  config.epochs = 1
  workdir = _with_teacher(digits_teacher, tmp_path)
  runs = _by_method(experiment.train_and_evaluate(config, workdir)["runs"])
  student = runs["student"][0]["params"]
  aware, greedy = runs["inherit_aware"][0], runs["inherit_greedy"][0]
  # A uniform rank at the student's size, truncated for the output error.
  assert aware["init"] == "data_aware" and aware["rank"] >= 1 and aware["params"] <= student
  # Per-layer ranks: no uniform rank to report, at most the student's size.
  assert greedy["init"] == "svd" and greedy["rank"] is None and greedy["params"] <= student
  for r in (aware, greedy):
    assert r["metric_at_init"] == r["history"]["test_metric"][0]


@pytest.mark.slow
def test_a_changed_experiment_does_not_resume_silently(tmp_path):
  """teacher.epochs changed: refused at the teacher's checkpoint; allowed deliberately."""
  from inhernet_jax.training import checkpoint

  config = _config("digits", "local")
  config.methods, config.epochs, config.teacher.epochs = "inherit", 1, 1
  config.method_defs.inherit.rank = "4"
  first = experiment.train_and_evaluate(config, str(tmp_path))
  config.teacher.epochs = 2
  with pytest.raises(checkpoint.CheckpointError, match="epochs: checkpoint 1, now 2") as e:
    experiment.train_and_evaluate(config, str(tmp_path))
  assert "teacher" in str(e.value)
  # Extended deliberately, the teacher trains one more epoch; the InherNet run, now
  # inherited from another teacher, is refused in turn ...
  config.allow_resume_changes = "epochs"
  with pytest.raises(checkpoint.CheckpointError, match=r"seed_0/inherit/.*\n  teacher: checkpoint"):
    experiment.train_and_evaluate(config, str(tmp_path))
  # ... unless that is allowed too.
  config.allow_resume_changes = "epochs,teacher"
  second = experiment.train_and_evaluate(config, str(tmp_path))
  runs = {r["method"]: r for r in second["runs"]}
  assert runs["teacher"]["history"]["epoch"] == [0, 1, 2]
  assert first["runs"][0]["history"]["epoch"] == [0, 1]


def _inherit(**fields):
  return MethodDef.from_config("inherit", {"kind": "inhernet", "rank": 4, **fields})


def test_recalibrate_field_re_estimates_on_the_seeds_first_training_batches(tmp_path):
  import jax
  import jax.numpy as jnp

  from inhernet_jax import models
  from inhernet_jax.calibration import batch_stats
  from inhernet_jax.calibration import grams as calibration
  from inhernet_jax.data import pipeline as data
  from inhernet_jax.data import fashion_mnist

  fashion_mnist.write_fake(str(tmp_path), 24, 4)
  pipe = data.get({"name": "fashion_mnist", "data_dir": str(tmp_path)}, batch_size=4, seed=2)
  model = models.create("resnet8", num_classes=10, num_filters=(4, 4, 4, 4))
  v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  out, count = experiment._recalibrate(_inherit(recalibrate=True, recalibration_batches=2),
                                       "inherit", model, v, pipe)
  want = batch_stats.recalibrate_batch_stats(model, v, [pipe.train_batch(0), pipe.train_batch(1)])
  assert count == 2
  jax.tree.map(np.testing.assert_array_equal, out["batch_stats"], want["batch_stats"])
  assert experiment._recalibrate(_inherit(recalibrate=False), "inherit", model, v, pipe) == (v, 0)
  default, count = experiment._recalibrate(_inherit(), "inherit", model, v, pipe)  # On by default.
  assert count == experiment.RECALIBRATION_BATCHES == 32
  assert not np.allclose(default["batch_stats"]["bn_init"]["var"], 1)
  no_bn = {"params": v["params"]}  # Nothing to re-estimate.
  assert experiment._recalibrate(_inherit(), "inherit", model, no_bn, pipe) == (no_bn, 0)
  with pytest.raises(ValueError, match="method_defs.inherit.recalibration_batches must be >= 1"):
    experiment._recalibrate(_inherit(recalibrate=True, recalibration_batches=0), "inherit",
                            model, v, pipe)
