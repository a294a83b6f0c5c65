"""launch._moved: the old benchmark launchers forward to `benchmarks` and warn."""

import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.parametrize("old,new", [("benchmark_llama", "llama"), ("benchmark_budget", "budget")])
def test_an_old_import_is_the_new_module_with_a_warning(old, new):
  sys.modules.pop(f"launch.{old}", None)
  with pytest.warns(DeprecationWarning, match=f"launch.{old} moved to benchmarks.{new}"):
    module = importlib.import_module(f"launch.{old}")
  assert module is importlib.import_module(f"benchmarks.{new}")
  from launch import benchmark_llama  # noqa: F401  (the package attribute is the new one too)

  assert sys.modules[f"launch.{old}"] is module


def test_an_old_command_runs_the_new_program_with_its_flags():
  old = subprocess.run([sys.executable, "-m", "launch.benchmark_budget", "--problems=3", "--seed=1"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
  new = subprocess.run([sys.executable, "-m", "benchmarks.budget", "--problems=3", "--seed=1"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
  assert "3 problems" in new.stdout
  # Same figures but the greedy's time.
  assert old.stdout.split("greedy")[0] == new.stdout.split("greedy")[0]
  assert "moved to benchmarks.budget" in old.stderr
