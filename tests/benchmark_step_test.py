"""Tests for `benchmarks.step` on a tiny model (what it measures, not how fast)."""

import subprocess
import sys

import pytest

from benchmarks import step

FAST = dict(rank=0.5, warmup=0, steps=1)


def test_rows_of_teacher_and_inherited_with_ratios():
  rows = step.with_ratios([step.measure("cnn", 4, v, "float32", **FAST) for v in ("teacher", "inherited")])
  teacher, inherited = rows
  assert inherited["params"] < teacher["params"]
  for r in rows:
    assert r["train_ms"] > 0 and r["eval_ms"] > 0 and r["train_compile_s"] > 0
    assert set(r["train_matmul_dtypes"]) == {"f32"}
  # The inherited step has the factor convs: more (smaller) matmuls than the teacher's.
  assert sum(inherited["train_matmul_dtypes"].values()) > sum(teacher["train_matmul_dtypes"].values())
  assert inherited["train_vs_teacher"] == pytest.approx(inherited["train_ms"] / teacher["train_ms"])
  assert "cnn" in step.markdown(rows, "cpu", 1)


def test_bfloat16_step_has_no_float32_matmuls():
  with pytest.raises(ValueError, match="no dtype field"):
    step.measure("cnn", 4, "inherited", "bfloat16", **FAST)
  row = step.measure("resnet8", 2, "inherited", "bfloat16", **FAST)
  assert set(row["train_matmul_dtypes"]) == {"bf16"}, row["train_matmul_dtypes"]
  assert set(row["eval_matmul_dtypes"]) == {"bf16"}, row["eval_matmul_dtypes"]


def test_importing_defines_no_flags():
  """Tests import this module beside launchers with --rank / --heads flags."""
  code = "import benchmarks.step; from absl import flags; print(sorted(flags.FLAGS))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "rank" not in out.stdout and "heads" not in out.stdout, out.stdout
