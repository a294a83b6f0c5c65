"""The naive baseline of `benchmarks.memory`: every layer slice through a full SVD.

`full_svd_inherit` is the inheritance done the naive way (a Python loop over
``jnp.linalg.svd`` of every layer slice of every factorised kernel, then truncated: a
per-layer ``torch.linalg.svd`` loop, in JAX); `run_baseline_cpu` times it against our
path on the reduced stack on one CPU device (time, peak bytes, and how close our
truncation's error is to the optimal one), `run_device_full_svd` on the full stack on
one accelerator.

Example:
  ```python
  base = full_svd_inherit(teacher_params, spec(rank=16, heads=2), layers=1)
  base["seconds_estimate"], base["slices_run"], base["slices"]
  ```
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.memory_teacher import (Shape, bytes_per_device, param_shapes, power_law,
                                       random_teacher, sharded, spec, timed_inherit)
from inhernet_jax.decomposition.policy import layer_plan


def _planned_kernels(params, inherit_spec):
  """(path, kernel, rank, heads) of every kernel the spec factorises, sorted by path."""
  from flax import traverse_util

  out = []
  for path, leaf in sorted(traverse_util.flatten_dict(params, sep="/").items()):
    if not path.endswith("kernel"):
      continue
    stack = inherit_spec.stack_axes(path) or 0
    m, n = int(np.prod(leaf.shape[stack:-1])), int(leaf.shape[-1])
    plan = layer_plan(inherit_spec, path, m, n, use_bias=False)
    if plan.factorize:
      out.append((path, leaf, stack, plan.rank, plan.heads))
  return out


@functools.partial(jax.jit, static_argnames=("rank", "heads"))
def _full_svd_layer(a, rank, heads):
  """One layer slice: full SVD, truncated; down ``U_r``, every head ``S_r V_r^T``."""
  u, s, vt = jnp.linalg.svd(a.astype(jnp.float32), full_matrices=False)
  up = s[:rank, None] * vt[:rank]
  return u[:, :rank].astype(a.dtype), jnp.broadcast_to(up, (heads, *up.shape)).astype(a.dtype)


def full_svd_inherit(params, inherit_spec, *, layers: int = 0, trace=None) -> dict:
  """The naive baseline: a Python loop of full SVDs, one per layer slice.

  Returns ``{"seconds", "seconds_estimate", "slices_run", "slices", "out"}``: the
  wall time of the slices run and its linear extrapolation to every slice (``layers``
  > 0 runs only the first ``layers`` slices of each stacked kernel). ``trace(shape)`` is
  called after every slice with the slice's matrix shape.
  """
  out, run, total = {}, 0, 0
  start = time.time()
  for path, kernel, stack, rank, heads in _planned_kernels(params, inherit_spec):
    mats = kernel.reshape(-1, int(np.prod(kernel.shape[stack:-1])), kernel.shape[-1])
    count = mats.shape[0] if not layers else min(layers, mats.shape[0])
    total += mats.shape[0]
    downs, ups = [], []
    for i in range(count):
      down, up = _full_svd_layer(mats[i], rank=rank, heads=heads)
      jax.block_until_ready(up)
      downs.append(down)
      ups.append(up)
      run += 1
      if trace is not None:
        trace(mats.shape[1:], rank, heads, kernel.dtype)
    out[path] = (jnp.stack(downs), jnp.stack(ups))
    del downs, ups
  jax.block_until_ready(out)
  seconds = time.time() - start
  return {"seconds": seconds, "seconds_estimate": seconds * total / run, "slices_run": run,
          "slices": total, "out": out}


def _svd_temp_bytes(shape, rank, heads, dtype, cache={}):
  key = (tuple(shape), rank, heads, str(dtype))
  if key not in cache:
    arg = jax.ShapeDtypeStruct(shape, dtype)
    compiled = _full_svd_layer.lower(arg, rank=rank, heads=heads).compile()
    cache[key] = int(compiled.memory_analysis().temp_size_in_bytes)
  return cache[key]


def run_baseline_cpu(shape: Shape, rank: int, inherit_spec, *, heads: int, dtype: str,
                     spectrum: str, layers: int) -> dict:
  """Reduced stack on one CPU device: our kernel-by-kernel path vs per-layer full SVDs.

  ``inherit_spec`` has ``rank`` and ``heads``; ``spectrum`` is ``"gaussian"`` (random
  kernels) or ``"power_law"`` (singular values ``1/i``); ``layers`` as `full_svd_inherit`'s.
  """
  from inhernet_jax.parallel import sharding
  from benchmarks.memory_plan import stage_temp_bytes

  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  abstract = sharded(param_shapes(shape, jnp.dtype(dtype)), mesh, sharding.DEFAULT_RULES)
  if spectrum == "power_law":
    teacher_params = jax.tree.map(lambda a: jax.device_put(power_law(a), a.sharding), abstract)
  else:
    teacher_params = random_teacher(abstract)
  jax.block_until_ready(teacher_params)
  gc.collect()
  teacher = bytes_per_device(jax.tree.leaves(teacher_params))
  other = bytes_per_device(jax.live_arrays()) - teacher
  result = {"shape": dataclasses.asdict(shape), "rank": rank, "heads": heads,
            "dtype": dtype, "device": str(jax.devices()[0]), "teacher_bytes": teacher,
            "spectrum": spectrum}

  ours = functools.partial(timed_inherit, teacher_params, inherit_spec, mesh=mesh)
  peaks = []
  _, cold = ours()
  out, _ = ours(lambda st: peaks.append(
      bytes_per_device(jax.live_arrays()) - other + stage_temp_bytes(st)))
  our_factors = _factors(out, inherit_spec, teacher_params)
  del out
  gc.collect()
  _, warm = ours()
  gc.collect()
  result["inherit"] = {"seconds_cold": cold, "seconds_warm": warm, "peak_bytes": max(peaks),
                       "ratio": max(peaks) / teacher, "error_ratio_vs_full_svd": None}
  base_peaks = []
  full_svd_inherit(teacher_params, inherit_spec, layers=1)  # Compiles every shape once.
  gc.collect()
  base = full_svd_inherit(teacher_params, inherit_spec, layers=layers,
                          trace=lambda *a: base_peaks.append(
                              bytes_per_device(jax.live_arrays()) - other + _svd_temp_bytes(*a)))
  result["inherit"]["error_ratio_vs_full_svd"] = _error_ratio(
      teacher_params, our_factors, base["out"], inherit_spec)
  result["full_svd"] = {"seconds_warm": base["seconds"], "seconds_estimate": base["seconds_estimate"],
                        "slices_run": base["slices_run"], "slices": base["slices"],
                        "peak_bytes": max(base_peaks), "ratio": max(base_peaks) / teacher}
  result["speedup"] = base["seconds_estimate"] / warm
  return result


def _factors(out, inherit_spec, teacher_params) -> dict:
  """path -> (down, up) of an inherited params tree."""
  from flax import traverse_util

  flat = traverse_util.flatten_dict(out, sep="/")
  return {path: (flat[f"{path[:-len('kernel')]}down/kernel"], flat[f"{path[:-len('kernel')]}up/kernel"])
          for path, *_ in _planned_kernels(teacher_params, inherit_spec)}


def _error_ratio(teacher_params, ours: dict, full: dict, inherit_spec) -> float:
  """Largest ``||A - ours||_F / ||A - full SVD||_F`` over the slices both computed
  (1.0: our truncation is as good as the optimal one)."""
  worst = 0.0
  for path, kernel, stack, rank, heads in _planned_kernels(teacher_params, inherit_spec):
    m, n = int(np.prod(kernel.shape[stack:-1])), kernel.shape[-1]
    count = full[path][0].shape[0]
    a = np.asarray(kernel, np.float64).reshape(-1, m, n)[:count]

    def err(down, up):
      d = np.asarray(down, np.float64).reshape(-1, m, rank)[:count]
      u = np.asarray(up, np.float64).reshape(-1, heads, rank, n)[:count, 0]
      return np.linalg.norm(a - d @ u)

    worst = max(worst, err(*ours[path]) / max(err(*full[path]), 1e-30))
  return float(worst)


def run_device_full_svd(shape: Shape, rank: int, heads: int, dtype: str, rules,
                        layers: int) -> dict:
  """The full stack on one accelerator, inherited by per-layer full SVDs."""
  device = jax.devices()[0]
  from inhernet_jax.parallel import sharding

  mesh = sharding.make_mesh({"data": 1}, devices=[device])
  inherit_spec = spec(rank, heads)
  abstract = sharded(param_shapes(shape, jnp.dtype(dtype)), mesh, rules)
  teacher_params = random_teacher(abstract)
  jax.block_until_ready(teacher_params)
  teacher = bytes_per_device(jax.tree.leaves(teacher_params))
  base = full_svd_inherit(teacher_params, inherit_spec, layers=layers)
  peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
  return {"device": str(device), "dtype": dtype, "rank": rank, "heads": heads,
          "teacher_bytes": teacher, "peak_bytes_in_use": peak,
          "ratio": None if peak is None else peak / teacher,
          "seconds": base["seconds"], "seconds_estimate": base["seconds_estimate"],
          "slices_run": base["slices_run"], "slices": base["slices"],
          "note": "seconds include compiling each matrix shape once"}
