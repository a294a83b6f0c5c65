"""The computation of one planned batch, and the jitted executor.

`decompose_group` is what every executor runs for one `plan.Group` (the host one per
matrix, the sharded one per group of layers): the kernels' slices as one batch of
matrices, their truncated SVD by the group's method (`truncate`: from the start
matrices of the plan's seeds, `start_bits`), and each kernel's params
(`assemble.factor_params`). `run` is the jitted executor: one program per group
(accelerators, or inside a jit). A numerical failure names the kernel.

Example:
    ```python
    outs = run(plan)          # {path: assemble.Inherited}
    ```
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from inhernet_jax.decomposition import assemble
from inhernet_jax.decomposition import svd


def truncate(a, gram, start_matrices, method, rank, power_iters, damping, *, xp):
  """``(u, s, v, ok)`` of a batch of matrices by ``method`` (``ok``: data-aware only)."""
  if method == "whitened":
    return svd.whitened_svd(a, gram, rank, damping, xp=xp)
  if method == "exact":
    return (*svd.exact_svd(a, rank, xp=xp), None)
  return (*svd.randomized_svd(a, rank, start_matrices, power_iters, xp=xp), None)


def decompose_group(arrays, biases, grams, counts, bits, *, group_meta, method, m, n,
                    rank, power_iters, damping, xp, width=0):
  """The computation of one `Group`: its kernels' slices as one batch of matrices,
  their truncated SVD by ``method`` (randomized: from the packed start ``bits`` of
  ``width`` columns, `start_bits`, or their unpacked `svd.signs`), and each kernel's
  ``((u, s, v), params)`` (`assemble.factor_params`); plus, data-aware, whether each
  slice was whitened (its Gram finite) (else None)."""
  a = xp.concatenate([x.reshape(-1, m, n) for x in arrays])
  start_matrices = bits
  if bits is not None and bits.dtype == np.uint8:
    start_matrices = svd.signs(bits, min(m, n), width, xp=xp)
  g = None
  if method == "whitened":
    # Per-row means: the factors' scales do not depend on the number of calibration rows.
    g = xp.concatenate([(g / c[..., None, None]).reshape(-1, m, m) for g, c in zip(grams, counts)])
  u, s, v, ok = truncate(a, g, start_matrices, method, rank, power_iters, damping, xp=xp)
  return assemble.factor_params(u, s, v, biases, group_meta, xp=xp), ok


decompose_group_jit = jax.jit(
    decompose_group,
    static_argnames=("group_meta", "method", "m", "n", "rank", "power_iters", "damping", "xp",
                     "width"))


def start_bits(group, i: int):
  """Kernel ``i`` of a randomized group: its packed start matrices ``(slices,
  svd.packed_bytes)`` from its seeds (`svd.start_bits`; a traced key's kernel key:
  `svd.traced_start_bits`)."""
  k, seeds = group.kernels[i], group.seeds[i]
  rows = min(k.m, k.n)
  if isinstance(seeds, tuple):
    return svd.start_bits(seeds, rows, group.width)
  return svd.traced_start_bits(seeds, k.layers, rows, group.width)


def biases(kernels, host: bool):
  return tuple(None if k.bias is None else np.asarray(k.bias) if host else k.bias for k in kernels)


def run(plan) -> dict:
  """The jitted executor: one program per group; ``{path: assemble.Inherited}``."""
  outs = {}
  for group in plan.groups:
    results, ok = _run_group(group)
    check_finite(group, results)
    outs.update(assemble.inherited(group, results, ok, plan.key))
  return outs


def _run_group(group):
  ks = group.kernels
  grams = counts = bits = None
  if group.method == "whitened":
    grams = tuple(k.gram[0] for k in ks)
    counts = tuple(jnp.asarray(k.gram[1]) for k in ks)
  if group.method == "randomized":
    parts = [start_bits(group, i) for i in range(len(ks))]
    bits = (np if all(isinstance(p, np.ndarray) for p in parts) else jnp).concatenate(parts)
  try:
    return decompose_group_jit(
        tuple(k.kernel for k in ks), biases(ks, False), grams, counts, bits,
        group_meta=tuple(k.meta for k in ks), method=group.method, m=group.m, n=group.n,
        rank=group.rank, power_iters=group.power_iters, damping=group.damping, xp=jnp,
        width=group.width)
  except (np.linalg.LinAlgError, FloatingPointError, ValueError) as e:
    raise ValueError(f"inherit: the {group.method} SVD of {group.paths} failed: {e}") from e


def check_finite(group, results) -> None:
  """Raises naming the kernel whose factors are not finite (concrete arrays only)."""
  for k, ((u, s, v), _) in zip(group.kernels, results):
    if any(isinstance(x, jax.core.Tracer) for x in (u, s, v)):
      return
    if not all(bool(np.isfinite(np.asarray(x)).all()) for x in (u, s, v)):
      raise ValueError(
          f"{k.path}: the {group.method} SVD produced non-finite factors (kernel of shape "
          f"{tuple(k.kernel.shape)}, rank {group.rank}); try InherSpec(method='exact') or skip "
          f"it with a rule ({re.escape(k.path)!r}, 'skip')")
