"""benchmarks.scale: the CPU part at a tiny size on 2 simulated devices.

The sharded steps (data, fsdp and tensor parallel, inherited ViT layers included) must
compute the 1-device loss, and every figure must be a finite positive number.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
# XLA's CPU backend (LLVM) at -O0: the benchmark's programs compile in about half the
# CPU time; what is checked (figures finite and positive, losses equal across meshes)
# holds at any level. First in XLA_FLAGS: XLA stops reading at a bare token.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_cpu_part_tiny(tmp_path):
  out = tmp_path / "scale.json"
  cmd = [sys.executable, "-m", "benchmarks.scale", "--parts=cpu", "--tiny",
         "--cpu_devices=2", "--cpu_models=resnet8:8,vit_tiny+inh:8", f"--out={out}"]
  env = dict(os.environ, XLA_FLAGS=f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}")
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
  assert res.returncode == 0, res.stderr[-4000:]
  assert "| time vs 1 dev |" in res.stdout
  part = json.loads(out.read_text())["cpu"]
  assert part["simulated_devices"] == 2 and "overhead" in part["note"]
  rows = part["rows"]
  meshes = {(r["model"], r["variant"], tuple(sorted(r["mesh_shape"].items()))) for r in rows}
  assert len(meshes) == len(rows) == 3 + 4  # resnet8: 1 device, data, fsdp; vit: + model
  assert {r["rules"] for r in rows} == {"default", "tensor_parallel"}
  assert {r["devices"] for r in rows} == {1, 2}
  for r in rows:
    for key in ("compile_s", "step_s_median", "step_s_pipelined", "examples_per_s",
                "time_vs_1_device", "loss_step0", "loss_final", "params",
                "flops_per_device_xla", "flops_step_xla_unoptimized"):
      assert _positive(r[key]), (key, r)
    assert math.isfinite(r["loss_step0_diff_vs_1_device"])
    assert r["loss_step0_diff_vs_1_device"] <= 1e-5, r
    assert r["loss_ok"]
  assert part["loss_check_ok"]
  inherited = [r for r in rows if r["variant"].startswith("inherited")]
  assert inherited and all(r["model"] == "vit_tiny" for r in inherited)
