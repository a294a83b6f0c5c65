"""Tests for `inhernet_jax.decomposition.host`: the host executor's one pool over every group."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import inhernet_jax as ij
from inhernet_jax import InherSpec
from inhernet_jax.decomposition import compute
from inhernet_jax.decomposition import host
from inhernet_jax.decomposition import plan


def _matrix(m, n, seed, stack=()):
  """Separated singular values (``0.8^i``): factors comparable entry by entry."""
  rng = np.random.default_rng(seed)
  k = min(m, n)
  u = np.linalg.qr(rng.standard_normal((*stack, m, k)))[0]
  v = np.linalg.qr(rng.standard_normal((*stack, n, k)))[0]
  return ((u * 0.8 ** np.arange(k)) @ np.swapaxes(v, -1, -2)).astype(np.float32)


def _planned(params, spec, calibration=None):
  return plan.build(plan.collect(params, spec), spec, calibration=calibration).groups


PARAMS = {
    "head": {"kernel": _matrix(300, 160, 0), "bias": np.arange(160, dtype=np.float32)},
    "stack": {"kernel": _matrix(160, 256, 1, stack=(3,))},
    "small": {"kernel": _matrix(24, 16, 2)},
    "white": {"kernel": _matrix(20, 30, 3)},
}
SPEC = InherSpec(rank=6, heads=2, rules=((r"stack/kernel", {"stack": 1}),
                                         (r"white/kernel", {"data_aware": True})))
GRAM = _matrix(20, 20, 4) @ _matrix(20, 20, 4).T + np.eye(20, dtype=np.float32)
CALIBRATION = {"white/kernel": {"gram": GRAM * 7, "count": 7}}


def test_one_pool_gives_each_groups_batched_result():
  """The pool runs every slice of every group as its own task, largest first; the
  result of each group equals its batched NumPy computation (`compute.decompose_group`)."""
  groups = _planned(PARAMS, SPEC, CALIBRATION)
  assert sorted(g.method for g in groups) == ["exact", "randomized", "randomized", "whitened"]
  outs = host.decompose(groups)
  for group, (results, ok) in zip(groups, outs):
    ks = group.kernels
    grams = counts = None
    if group.method == "whitened":
      grams, counts = (GRAM * 7,), (np.float64(7),)
    bits = (np.concatenate([compute.start_bits(group, i) for i in range(len(ks))])
            if group.method == "randomized" else None)
    ref, ref_ok = compute.decompose_group(
        tuple(k.matrices() for k in ks), compute.biases(ks, True), grams, counts, bits,
        group_meta=tuple(k.meta for k in ks), method=group.method, m=group.m, n=group.n, rank=group.rank,
        power_iters=group.power_iters, damping=SPEC.damping, xp=np, width=group.width)
    assert (ok is None) == (ref_ok is None)
    for ((f, params), (rf, rparams)) in zip(results, ref):
      for x, y in zip(f, rf):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)
      np.testing.assert_allclose(params["up"]["kernel"], rparams["up"]["kernel"], rtol=2e-5, atol=2e-6)


def test_failure_names_kernel_and_stack_slice(monkeypatch):
  real = compute.truncate

  def failing(a, *args, **kwargs):
    if a.shape[-2:] == (160, 256) and abs(float(a[0, 0, 0]) - float(PARAMS["stack"]["kernel"][2, 0, 0])) == 0:
      raise np.linalg.LinAlgError("SVD did not converge")
    return real(a, *args, **kwargs)

  monkeypatch.setattr(compute, "truncate", failing)
  with pytest.raises(ValueError, match=r"stack/kernel \(stack slice 2\).*did not converge"):
    ij.inherit(PARAMS, SPEC, calibration=CALIBRATION)


def test_blas_is_single_threaded_in_every_task_of_a_fresh_process():
  """threadpoolctl limits only the BLAS libraries already loaded: SciPy's own OpenBLAS
  must be loaded before the pool starts (a cold call ran 3x slower without it)."""
  code = textwrap.dedent("""
      import numpy as np, threadpoolctl
      from inhernet_jax import InherSpec, inherit
      from inhernet_jax.decomposition import compute
      seen, real = [], compute.truncate
      def spy(*args, **kwargs):
        out = real(*args, **kwargs)  # Then every BLAS this task used is loaded.
        seen.extend(i["num_threads"] for i in threadpoolctl.threadpool_info()
                    if i["user_api"] == "blas")
        return out
      compute.truncate = spy
      rng = np.random.default_rng(0)
      params = {f"l{i}": {"kernel": rng.standard_normal((300, 160)).astype(np.float32)}
                for i in range(2)}
      inherit(params, InherSpec(rank=4))
      print(sorted(set(seen)))
  """)
  env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  threads = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307  (our own print)
  if host.workers() > 1:
    assert threads == [1], threads
