"""The host executor: a plan's groups on the CPU with NumPy, one task per matrix.

On the CPU, compiling one XLA program per shape costs more than the arithmetic, so
concrete kernels in host memory are decomposed with NumPy/SciPy. Every stack slice of
every `plan.Group` is one task, and the tasks of all groups share one pool of one
thread per core, largest first: a lone big matrix (an LM head) runs beside the other
groups' slices instead of after them. BLAS is single-threaded meanwhile: OpenBLAS's
own threads are slow at these sizes (its 2-thread LU and QR of a ``2752 x 160`` panel
take twice as long as one thread's), so one matrix per core is 2-3x faster for the
same arithmetic. A slice's numbers do not depend on its task or its batch: each draws
its own start (the plan's seeds), so the jitted executor gives the same factors.

Example:
    ```python
    outs = run(plan)          # {path: assemble.Inherited}
    ```
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os

import numpy as np
# Loaded before `_one_blas_thread` runs: threadpoolctl limits the BLAS libraries loaded
# when it is called, and SciPy brings its own OpenBLAS (unlimited, a cold call took 3x).
import scipy.linalg  # noqa: F401

from inhernet_jax.decomposition import assemble
from inhernet_jax.decomposition import compute
from inhernet_jax.decomposition import svd


def workers() -> int:
  """Threads of the pool: the cores this process may run on."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def run(plan) -> dict:
  """The host executor: ``{path: assemble.Inherited}`` of every factorised kernel."""
  outs = {}
  for group, (results, ok) in zip(plan.groups, decompose(plan.groups)):
    compute.check_finite(group, results)
    outs.update(assemble.inherited(group, results, ok, plan.key))
  return outs


def decompose(groups):
  """Decomposes every group; returns ``[(results, ok)]`` in group order, as
  `compute.decompose_group` does (``results``: per kernel ``((u, s, v), params)``).

  Raises:
    ValueError: naming the kernel (and stack slice) whose decomposition failed.
  """
  tasks, outs = [], []
  for g, group in enumerate(groups):
    rows = min(group.m, group.n)
    outs.append([None] * group.slices)
    i = 0
    for index, k in enumerate(group.kernels):
      mats = k.matrices()
      grams = None
      if group.method == "whitened":
        gram, count = (np.asarray(x, np.float64) for x in k.gram)
        grams = (gram / count[..., None, None]).reshape(-1, k.m, k.m)
      seeds = group.seeds[index] if group.method == "randomized" else None
      for j in range(mats.shape[0]):
        tasks.append(_Task(g, i, k.path, j, mats[j], None if grams is None else grams[j],
                           None if seeds is None else seeds[j], rows, _cost(group)))
        i += 1
  tasks.sort(key=lambda t: -t.cost)  # Longest first: the pool ends with the small ones.

  def one(t: _Task):
    group = groups[t.group]
    a, gram, start = t.matrix[None], None if t.gram is None else t.gram[None], None
    if t.seed is not None:
      start = svd.signs(svd.start_bits([t.seed], t.rows, group.width), t.rows, group.width, xp=np)
    try:
      out = compute.truncate(a, gram, start, group.method, group.rank, group.power_iters,
                             group.damping, xp=np)
    except (np.linalg.LinAlgError, FloatingPointError, ValueError) as e:
      where = f" (stack slice {t.slice})" if len(group.kernels) > 1 or group.slices > 1 else ""
      raise ValueError(f"inherit: the {group.method} SVD of {t.path}{where} failed: {e}") from e
    outs[t.group][t.index] = out

  def finish(g):
    group = groups[g]
    u, s, v, ok = (None if p[0] is None else np.concatenate(p) for p in zip(*outs[g]))
    biases = compute.biases(group.kernels, True)
    meta = tuple(k.meta for k in group.kernels)
    return assemble.factor_params(u, s, v, biases, meta, xp=np), ok

  results, remaining = [None] * len(groups), [group.slices for group in groups]
  threads = min(workers(), len(tasks))
  if threads <= 1:
    for t in tasks:
      one(t)
    return [finish(g) for g in range(len(groups))]
  with _one_blas_thread(), concurrent.futures.ThreadPoolExecutor(threads) as pool:
    futures = {pool.submit(one, t): t for t in tasks}
    try:
      # A group's params are assembled here as soon as its last slice is done, while
      # the pool works on the other groups.
      for future in concurrent.futures.as_completed(futures):
        future.result()
        g = futures[future].group
        remaining[g] -= 1
        if not remaining[g]:
          results[g] = finish(g)
    except BaseException:
      pool.shutdown(cancel_futures=True)
      raise
  return results


class _Task:
  """One matrix: slice ``slice`` of kernel ``path``, item ``index`` of group ``group``."""

  __slots__ = ("group", "index", "path", "slice", "matrix", "gram", "seed", "rows", "cost")

  def __init__(self, group, index, path, slice_, matrix, gram, seed, rows, cost):
    self.group, self.index, self.path, self.slice = group, index, path, slice_
    self.matrix, self.gram, self.seed, self.rows, self.cost = matrix, gram, seed, rows, cost


def _cost(group) -> float:
  """Flops, roughly: what orders the tasks."""
  m, n = group.m, group.n
  if group.method == "randomized":
    return 2.0 * m * n * group.width * (2 * group.power_iters + 2)
  return 4.0 * m * n * min(m, n) + (m**3 if group.method == "whitened" else 0)


def _one_blas_thread():
  """BLAS limited to one thread while the tasks run in parallel (threadpoolctl, which
  scikit-learn brings; without it, BLAS keeps its threads)."""
  try:
    import threadpoolctl
  except ImportError:  # pragma: no cover
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(1, user_api="blas")
