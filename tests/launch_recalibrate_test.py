"""Tests for launch/recalibrate_flags.py (``--recalibrate``, ``--recalibration_batches``) and
launch/compare_init.py's re-estimated rows, on Fashion-MNIST IDX files the test writes."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import app, flags
from absl.testing import flagsaver

from inhernet_jax import models
from inhernet_jax.calibration import batch_stats
from inhernet_jax.calibration import grams as calibration
from inhernet_jax.data import pipeline as data
from inhernet_jax.data import fashion_mnist

import launcher_env

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def recal():
  from launch import recalibrate_flags  # Defines its flags.

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return recalibrate_flags


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("fmnist")
  fashion_mnist.write_fake(str(root), 16, 4)
  config = ml_collections.ConfigDict({
      "data": {"name": "fashion_mnist", "data_dir": str(root)}, "batch_size": 4, "seed": 1})
  model = models.create("resnet8", num_classes=10, num_filters=(4, 4, 4, 4))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  return config, model, variables


def test_default_re_estimates_when_there_is_batch_norm_and_data(recal, setup):
  config, model, variables = setup
  with flagsaver.flagsaver(recalibration_batches=3):
    out, note = recal.maybe_recalibrate(model, variables, config)
  assert note == "BatchNorm statistics re-estimated on 3 training batches of 12 fashion_mnist images"
  pipe = data.get(config.data, batch_size=4, seed=1)
  want = batch_stats.recalibrate_batch_stats(model, variables, [pipe.train_batch(s) for s in range(3)])
  jax.tree.map(np.testing.assert_array_equal, out["batch_stats"], want["batch_stats"])
  assert not np.allclose(out["batch_stats"]["bn_init"]["mean"], 0)


def test_off_or_nothing_to_do_returns_the_variables(recal, setup):
  config, model, variables = setup
  with flagsaver.flagsaver(recalibrate=False):
    assert recal.maybe_recalibrate(model, variables, config) == (variables, None)
  assert recal.maybe_recalibrate(model, variables, None) == (variables, None)  # No data.
  mlp = {"params": {"w": jnp.ones(2)}}  # No BatchNorm: the data is never read.
  bad = ml_collections.ConfigDict({"data": {"name": "fashion_mnist", "data_dir": "/nonexistent"},
                                   "batch_size": 4})
  assert recal.maybe_recalibrate(None, mlp, bad) == (mlp, None)


def test_errors_name_the_flag(recal, setup):
  config, model, variables = setup
  with flagsaver.flagsaver(recalibrate=True):
    with pytest.raises(app.UsageError, match="--recalibrate needs --config"):
      recal.maybe_recalibrate(model, variables, None)
  with flagsaver.flagsaver(recalibration_batches=0):
    with pytest.raises(app.UsageError, match="--recalibration_batches must be >= 1"):
      recal.maybe_recalibrate(model, variables, config)
  bad = ml_collections.ConfigDict({"data": {"name": "fashion_mnist", "data_dir": "/nonexistent"},
                                   "batch_size": 4})
  with pytest.raises(app.UsageError, match="apt-get install dataset-fashion-mnist"):
    recal.maybe_recalibrate(model, variables, bad)


@pytest.mark.slow
def test_compare_init_reports_each_row_with_and_without_re_estimation(tmp_path):
  fashion_mnist.write_fake(str(tmp_path), 64, 16)
  env = launcher_env.env()
  proc = subprocess.run(
      [sys.executable, "-m", "launch.compare_init", "--config=configs/fashion_mnist.py:local",
       f"--config.data.data_dir={tmp_path}", f"--workdir={tmp_path / 'w'}", "--ranks=2",
       "--calibration_batches=1", "--recalibration_batches=2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "w" / "compare_init.json").read_text())
  assert result["recalibration_batches"] == 2
  assert 0 <= result["teacher_metric_recalibrated"] <= 1
  for row in result["equal_rank"] + result["budget"]:
    assert 0 <= row["metric"] <= 1 and 0 <= row["metric_recalibrated"] <= 1
  assert "with BN re-estimated" in proc.stdout
