"""launch/compare_init.py end to end (a subprocess) on the digits local variant."""

import json
import pathlib
import subprocess
import sys

import pytest

import launcher_env

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.slow
def test_compare_init_writes_both_comparisons(tmp_path):
  env = launcher_env.env()
  proc = subprocess.run(
      [sys.executable, "-m", "launch.compare_init", "--config=configs/digits.py:local",
       f"--workdir={tmp_path}", "--ranks=2,4", "--calibration_batches=2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "compare_init.json").read_text())
  rows = {(r["rank"], r["data_aware"]): r for r in result["equal_rank"]}
  assert set(rows) == {(2, False), (2, True), (4, False), (4, True)}
  for rank in (2, 4):
    plain, aware = rows[rank, False], rows[rank, True]
    assert plain["params"] == aware["params"]
    assert 0.0 <= aware["output_error"] and 0.0 <= aware["metric"] <= 1.0
  # More rank, less held-out output error (the same truncation, more directions kept).
  assert rows[4, False]["output_error"] < rows[2, False]["output_error"]
  budgets = {r["allocation"]: r for r in result["budget"]}
  assert set(budgets) == {"uniform", "greedy", "greedy, output spectra"}
  assert all(r["params"] <= r["budget"] for r in budgets.values())
  assert "held-out output error" in proc.stdout
