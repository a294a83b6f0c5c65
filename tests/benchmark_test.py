"""benchmarks.engine's LLaMA-shaped parts: the teacher, the error measure, the baselines,
and both entry points (``--parts=llama``, ``--device`` on the CPU) at a tiny size."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import llama as bl

ROOT = pathlib.Path(__file__).parents[1]
TINY = bl.Shape(layers=2, width=32, mlp=48, vocab=40)
RANK = 4
# XLA's CPU backend (LLVM) at -O0: the benchmark's programs compile in about half the
# CPU time; what is checked (figures finite and positive, errors near the optimal ones)
# holds at any level. First in XLA_FLAGS: XLA stops reading at a bare token.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def test_teacher_is_deterministic_bf16_and_decays():
  import ml_dtypes

  a = bl.host_teacher(TINY, "gaussian", seed=3)
  assert a.keys() == bl.leaf_shapes(TINY).keys()
  for path, w in a.items():
    assert w.shape == bl.leaf_shapes(TINY)[path] and w.dtype == np.float32
    np.testing.assert_array_equal(w.astype(ml_dtypes.bfloat16).astype(np.float32), w)
    np.testing.assert_array_equal(w, bl.host_teacher(TINY, "gaussian", seed=3)[path])
  d = bl.host_teacher(TINY, "decaying", seed=3)
  # Same draws, row i scaled by (i+1)^-0.5 (then rounded to bf16 again).
  fc2 = d["blocks/mlp/fc2/kernel"][1]
  scale = (np.arange(TINY.mlp) + 1.0) ** -0.5
  np.testing.assert_allclose(fc2, a["blocks/mlp/fc2/kernel"][1] * scale[:, None], rtol=1e-2)
  with pytest.raises(ValueError, match="spectrum"):
    bl.host_teacher(TINY, "flat")


def test_slices_cover_every_kernel_layer_not_the_embedding():
  mats = bl.slices(bl.host_teacher(TINY, "gaussian"))
  names = [n for n, _ in mats]
  assert names == bl.slice_names(TINY)
  assert len(names) == 7 * TINY.layers + 1 and "head/kernel" in names
  assert not any("embed" in n for n in names)
  assert dict(mats)["blocks/mlp/fc2/kernel[1]"].shape == (TINY.mlp, TINY.width)


def test_error_over_optimal_is_one_for_exact_truncation_and_above_otherwise():
  torch = pytest.importorskip("torch")
  torch.set_num_threads(1)
  mats = bl.slices(bl.host_teacher(TINY, "gaussian"))
  optimal = bl.optimal_errors(mats, RANK)
  weights = [bl.torch_weight(w) for _, w in mats]
  _, full = bl.time_full_svd(weights, RANK, repeats=1)
  exact = bl.summary(bl.torch_errors(mats, full), optimal)
  assert exact["error_over_optimal_max"] < 1 + 1e-5
  assert exact["error_over_optimal_mean"] > 1 - 1e-5
  _, pissa = bl.time_pissa(weights, RANK, repeats=1)
  ratios = bl.summary(bl.torch_errors(mats, [pissa[i] for i in range(len(mats))]), optimal)
  assert ratios["error_over_optimal_mean"] >= 1 - 1e-6
  # A worse rank-r approximation (the first r rows' directions) is measured as worse.
  w = mats[0][1]
  worse = bl.error(w, np.eye(w.shape[0])[:, :RANK], w[:RANK])
  assert worse / optimal[0] > 1.05


def test_inherited_factors_reproduce_our_truncation():
  import jax.numpy as jnp

  import inhernet_jax

  teacher = bl.host_teacher(TINY, "decaying")
  params = bl.nest(teacher, lambda w: jnp.asarray(w, jnp.bfloat16))
  out = inhernet_jax.inherit(params, bl.spec("default", RANK, heads=2))
  mats = bl.slices(teacher)
  factors = bl.inherited_factors(out, [n for n, _ in mats])
  errors = [bl.error(w, np.asarray(d), np.asarray(u)) for (_, w), (d, u) in zip(mats, factors)]
  ratios = bl.summary(errors, bl.optimal_errors(mats, RANK))["error_over_optimal"]
  assert all(1 - 1e-6 <= r < 1.05 for r in ratios), ratios
  with pytest.raises(KeyError, match="embed/embedding"):
    bl.inherited_factors(out, ["embed/embedding"])


def test_ratios_and_table():
  rows = bl.with_ratios([
      {"spectrum": "gaussian", "method": "ours default", "cold_s": 3.0, "warm_s": 1.0,
       "error_over_optimal_max": 1.001, "error_over_optimal_mean": 1.0005},
      {"spectrum": "gaussian", "method": "ours fast", "skipped": "no power_iters"},
      {"spectrum": "gaussian", "method": "PiSSA", "cold_s": None, "warm_s": 2.0},
  ])
  assert rows[0]["cold_vs_pissa"] == 1.5 and rows[0]["warm_vs_pissa"] == 0.5
  table = bl.markdown(rows, compile_column=True)
  assert "| gaussian | ours default | 3.00 s | 1.00 s | n/a | 1.50x | 0.50x | 1.001000 |" in table
  assert "skipped: no power_iters" in table


def _run(tmp_path, *args):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}")
  res = subprocess.run([sys.executable, "-m", "benchmarks.engine", *args, f"--out={out}"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
  assert res.returncode == 0, res.stderr[-4000:]
  return res.stdout, json.loads(out.read_text())


def _check_rows(rows, spectra):
  assert {r["spectrum"] for r in rows} == set(spectra)
  for r in rows:
    if r.get("skipped"):
      assert r["method"] == "ours fast"  # Only an engine without power_iters skips.
      continue
    assert r["warm_s"] > 0 and math.isfinite(r["warm_s"])
    assert 1 - 1e-5 <= r["error_over_optimal_mean"] <= r["error_over_optimal_max"] < 1.2
  pissa = [r for r in rows if r["method"].startswith("PiSSA")]
  assert len(pissa) == len(spectra) and all(r["warm_vs_pissa"] == 1.0 for r in pissa)


@pytest.mark.slow
def test_llama_part_tiny(tmp_path):
  stdout, result = _run(tmp_path, "--parts=llama", "--llama_shape=1,32,48,40", "--llama_rank=4",
                        "--llama_repeats=1", "--torch_threads=1")
  part = result["llama"]
  assert result["parts"] == ["llama"] and part["torch_threads"] == 1 and part["matrices"] == 8
  _check_rows(part["rows"], ["gaussian", "decaying"])
  methods = {r["method"] for r in part["rows"]}
  assert {"ours default", "ours fast", "ours exact", "torch.linalg.svd loop"} <= methods
  ours = [r for r in part["rows"] if r["method"].startswith("ours") and not r.get("skipped")]
  assert all(r["cold_s"] > 0 and r["cold_vs_pissa"] > 0 for r in ours)
  assert "| spectrum | method | cold | warm |" in stdout


@pytest.mark.slow
def test_device_part_falls_back_to_cpu_tiny(tmp_path):
  stdout, result = _run(tmp_path, "--device", "--device_layers=1", "--device_width=32",
                        "--device_mlp=48", "--device_vocab=40", "--device_rank=4",
                        "--device_spectra=decaying", "--torch_threads=1")
  d = result["device"]
  assert "no accelerator found, running on the CPU" in stdout
  assert d["platform"] == "cpu" and not d["accelerator"] and d["matrices"] == 8
  assert len(d["error_matrices"]) == 7  # The first layer's.
  _check_rows(d["rows"], ["decaying"])
  ours = d["rows"][0]
  assert ours["method"] == "ours default" and ours["compile_s"] >= 0
  assert ours["cold_s"] >= ours["compile_s"]
  assert "| compile |" in stdout


def test_optimal_error_from_the_gram_matches_the_svd():
  torch = pytest.importorskip("torch")
  mats = bl.slices(bl.host_teacher(TINY, "decaying"))
  want = bl.optimal_errors(mats, RANK)
  got = [bl.optimal_error_torch(torch.from_numpy(w.astype(np.float64)), RANK) for _, w in mats]
  np.testing.assert_allclose(got, want, rtol=1e-9)
