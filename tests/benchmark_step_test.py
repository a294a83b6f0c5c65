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


def test_interleaved_user_model_path_against_the_zoo():
  row = step.interleaved("cnn", 4, rank=0.5, rounds=2, calls=1)
  assert len(row["ratios"]) == 2 and row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
  assert row["ratio_median"] == pytest.approx(sorted(row["ratios"])[0] / 2 + sorted(row["ratios"])[1] / 2)
  assert row["same_ops"], "inherit_model's step lowers to other operations than the zoo's"
  assert row["same_program"], "inherit_model's step lowers to another program than the zoo's"


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


def test_forced_mixing_and_row_budget():
  row = step.measure("cnn", 4, "inherited", "float32", rank=0.5, warmup=0, steps=3,
                     mixing="outputs", budget_s=0.0)
  assert row["mixing"] == "outputs"
  assert row["train_steps"] == row["eval_steps"] == 1  # Budget spent: one timed call each.
  assert row["row_s"] >= row["train_compile_s"] + row["eval_compile_s"]


def test_run_budget_skips_rows_and_says_so():
  rows = step.run(["cnn:4"], dtype="float32", rank=0.5, heads=2, warmup=0, steps=1,
                  budget_s=0.0, log=lambda line: None)
  assert [r["variant"] for r in rows] == ["teacher", "inherited"]
  assert all("budget" in r["skipped"] for r in rows)
  assert "skipped: run budget" in step.markdown(rows, "cpu", 1)
  with pytest.raises(ValueError, match="name:batch"):
    step.run(["cnn"], dtype="float32", rank=0.5, heads=2, warmup=0, steps=1)


def test_torch_rows_of_the_demo_layer():
  pytest.importorskip("torch")
  tiny = dict(widths=(8, 8, 16, 16), blocks=(1, 1, 1, 1), image=8)
  rows = step.run(["resnet18_cifar:2"], dtype="bfloat16", rank=0.25, heads=2, warmup=0, steps=1,
                  variants=(), log=lambda line: None, torch_kwargs=tiny)
  teacher, demo = rows
  assert (teacher["model"], teacher["variant"], demo["variant"]) == (
      "resnet18_cifar[torch]", "teacher", "demo")
  assert demo["params"] < teacher["params"]
  assert demo["train_ms"] > 0 and demo["eval_ms"] > 0
  assert demo["train_vs_teacher"] == pytest.approx(demo["train_ms"] / teacher["train_ms"])
  assert "demo" in step.markdown(rows, "cpu", 1)
