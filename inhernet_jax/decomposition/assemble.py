"""Factors to params: the one place an inherited layer's params are made.

Every executor turns a kernel's truncated SVD ``(u, s, v)`` into the layer's params by
`factor_params` (the shared down-projection ``U_r``, every head ``S_r V_r^T``, the bias
copied into every head), inside its own computation; `inherited` adds the gate (none for
the ``"no_gate"`` variant; the ``"symmetric"`` one gets ``U_r`` once per head)
(`gate_params`: drawn from ``(key, crc32(path))`` only, so it does not depend on how
kernels are batched) and keeps what the report reads; `rebuild` puts the new params in
place of the teacher's kernels and biases.

Example:
    ```python
    results, ok = compute.decompose_group(...)            # per kernel ((u, s, v), params)
    outs = inherited(group, results, ok, key)            # {path: Inherited}
    student = rebuild(teacher_params, plan, outs)
    ```
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from inhernet_jax.decomposition import svd

# Why random and not zero: right after inheritance all heads are identical. If the gate
# were uniform for every input, each head's gradient would be the same (g_h = 1/H times
# the same term) and the gate's gradient would be zero (the heads' outputs agree), so the
# heads would stay identical forever and H heads would be one head. A random gate weighs
# the heads differently per sample, so their gradients differ from the first step. The
# scale is PyTorch's default Linear init, which the public demo uses.
gate_kernel_init = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class Inherited:
  """What an executor returns for one factorised kernel.

  Attributes:
    params: the params that replace its kernel and bias (``down``, ``up``, ``gate``).
    factors: ``(u, s, v)`` in the compute dtype, stack flattened (None: not kept).
    whitened: data-aware: per stack slice, whether whitening succeeded (else None).
  """

  params: dict
  factors: tuple | None = None
  whitened: Any = None


def factor_params(u, s, v, biases, meta, *, xp):
  """Per-kernel ``((u, s, v), params)`` of one group's batched factors; ``meta``: each
  kernel's `plan.Kernel.meta`."""
  u, v = svd.canonical_signs(u, v, xp=xp)
  out, start = [], 0
  for (lead, in_shape, n, rank, heads, dtype), bias in zip(meta, biases):
    sl = slice(start, start + int(np.prod(lead)))
    start = sl.stop
    dtype = jnp.dtype(dtype)
    down = u[sl].reshape(*lead, *in_shape, rank).astype(dtype)
    # Every head is S_r V_r^T: with gate weights summing to one the layer is exact.
    head = (s[sl][..., :, None] * xp.swapaxes(v[sl], -1, -2)).reshape(*lead, 1, rank, n)
    params = {
        "down": {"kernel": down},
        "up": {"kernel": xp.broadcast_to(head, (*lead, heads, rank, n)).astype(dtype)},
    }
    if bias is not None:
      b = bias.reshape(*lead, 1, n)
      params["up"]["bias"] = xp.broadcast_to(b, (*lead, heads, n)).astype(bias.dtype)
    out.append(((u[sl], s[sl], v[sl]), params))
  return out


def inherited(group, results, ok, key) -> dict[str, Inherited]:
  """Each kernel of a group: its params (as jax arrays) with the gate, its factors and
  (data-aware) which slices were whitened."""
  whitened = note_whitening(group.kernels, ok, group.damping) if ok is not None else None
  out = {}
  for i, (k, (factors, params)) in enumerate(zip(group.kernels, results)):
    # device_put, not jnp.asarray: the latter compiles a program per shape.
    params = jax.tree.map(jax.device_put, params)
    variant = k.plan.variant
    if variant == "symmetric" and k.plan.heads > 1:
      # One down-projection per head, each V_r^T: stored side by side, (..., H * r).
      params["down"]["kernel"] = jnp.concatenate([params["down"]["kernel"]] * k.plan.heads,
                                                 axis=-1)
    if k.plan.heads > 1 and variant != "no_gate":
      params["gate"] = gate_params(key, k)
    out[k.path] = Inherited(params, factors, None if whitened is None else whitened[i])
  return out


def note_whitening(kernels, ok, damping):
  """Per kernel, which stack slices were whitened; warns for each kernel whose input
  Gram was not finite (`svd.whitened_svd`: the only case it cannot whiten). Under jit:
  None, and the warnings come when it runs."""
  if isinstance(ok, jax.core.Tracer):
    jax.debug.callback(functools.partial(note_whitening, kernels, damping=damping), ok)
    return None
  ok, offset, out = np.asarray(ok), 0, []
  for k in kernels:
    whitened = ok[offset : offset + k.layers]
    offset += k.layers
    out.append(whitened)
    if not whitened.all():
      where = f" (stack slices {np.flatnonzero(~whitened).tolist()})" if k.stack else ""
      warnings.warn(
          f"{k.path}: the input Gram is not finite{where}; plain SVD used instead "
          f"(InherSpec.damping {damping}). Calibrate on finite inputs (an overflow in the "
          "Gram's accumulation: rescale the inputs or accumulate in float64)", stacklevel=5)
  return out


def gate_params(key, k) -> dict:
  """A random gate for one layer, U(-1/sqrt(r), 1/sqrt(r)) like `gate_kernel_init`.

  The draw depends on (key, path) only, not on how kernels happen to be grouped, and
  is made on the host with NumPy whenever the key is concrete (also under jit: the
  default key is a constant), so it compiles nothing and eager and jit agree. Only a
  traced key falls back to `jax.random`.
  """
  if isinstance(key, jax.core.Tracer):
    seed = zlib.crc32(k.path.encode())
    rank, heads, dtype = k.plan.rank, k.plan.heads, jnp.dtype(k.kernel.dtype)
    kernel = _draw_gates(key, seed & 0x7FFFFFFF, k.stack_shape, rank, heads, dtype.name)
    return {"kernel": kernel, "bias": jnp.zeros((*k.stack_shape, heads), dtype)}
  # device_put, not jnp.asarray: the latter compiles a program per shape.
  return jax.tree.map(jax.device_put, host_gate(key, k))


def host_gate(key, k) -> dict:
  """`gate_params` drawn with NumPy (a concrete key): ``{"kernel", "bias"}`` arrays."""
  seed = zlib.crc32(k.path.encode())
  rank, heads, dtype = k.plan.rank, k.plan.heads, jnp.dtype(k.kernel.dtype)
  with jax.ensure_compile_time_eval():  # A concrete key inside a jit trace.
    words = [0] if key is None else [int(w) for w in np.ravel(key_data(key))]
  bound = 1.0 / np.sqrt(rank)
  # Drawn in float64 and cast, so a bf16 teacher gets the same gates, rounded.
  gate = np.random.default_rng([*words, seed]).uniform(-bound, bound, (*k.stack_shape, rank, heads))
  return {"kernel": gate.astype(dtype), "bias": np.zeros((*k.stack_shape, heads), dtype)}


def key_data(key):
  return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _draw_gates(key, seed, stack_shape, rank, heads, dtype):
  keys = jax.random.split(jax.random.fold_in(key, seed), int(np.prod(stack_shape)))
  gates = jax.vmap(lambda k: gate_kernel_init(k, (rank, heads), jnp.float32))(keys)
  return gates.reshape(*stack_shape, rank, heads).astype(dtype)


def rebuild(params, plan, outs: Mapping[str, Inherited]):
  """``params`` with every factorised kernel (and its bias) replaced by its new params;
  every other leaf passes through as the same object."""
  factorised = {k.keys: outs[k.path] for k in plan.kernels if k.plan.factorize}
  return _rebuild(params, (), factorised)


def _rebuild(node, keys, factorised: dict):
  kernel = factorised.get(keys)
  out = {}
  for k, v in node.items():
    if isinstance(v, Mapping):
      out[k] = _rebuild(v, (*keys, str(k)), factorised)
    elif kernel is None or k not in ("kernel", "bias"):
      out[k] = v
  if kernel is not None:
    new = kernel.params
    clash = set(new) & set(out)
    if clash:
      raise ValueError(f"{'/'.join(keys)}: cannot add factor params {sorted(clash)}: names taken")
    out.update(new)
  return FrozenDict(out) if isinstance(node, FrozenDict) else out
