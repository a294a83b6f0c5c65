"""Which LAPACK computes an exact SVD: the host's, also inside `jax.jit` on the CPU.

`thin_svd` is the one full SVD every decomposition calls (the exact method, the
randomized method's small final SVD, data-aware truncation). On the host (NumPy) it is
NumPy's LAPACK. Jitted, it is chosen by the backend the program is compiled for
(`jax.lax.platform_dependent`): on the CPU, NumPy's LAPACK in float64 through
`jax.pure_callback` (`host_svd`), cast back; on accelerators, XLA's SVD. Inside the
sharded executor's stages (`batch_sharding`), the CPU callback runs per device under
`jax.shard_map`: a callback in an automatically partitioned program would run on one
device with every operand gathered onto it. The callback has no derivative rule (nothing
differentiates through a decomposition here) and lowers for one platform at a time.

Example:
  ```python
  u, s, vt = thin_svd(a)                  # jitted or not, any backend
  with batch_sharding(mesh, ("data",)):   # while tracing a sharded stage
    u, s, vt = thin_svd(a_split_over_data)
  ```
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P


def thin_svd(a, *, xp=jnp):
  """``(u, s, vt)``: the thin SVD of ``a`` (``(..., m, n)``), batched, in ``a``'s dtype.

  On the host NumPy's (LAPACK's ``gesdd``, in float64 even for float32 inputs: NumPy's
  linear algebra computes in double and casts back). Jitted, by the backend the
  program is compiled for (`jax.lax.platform_dependent`): on the CPU, NumPy's LAPACK in
  float64 through `jax.pure_callback` (`host_svd`), the results cast back; elsewhere
  XLA's SVD (``jnp.linalg.svd``: cuSOLVER on GPUs, a QDWH polar SVD on TPUs).

  Why not XLA's on the CPU: it calls the ``gesdd`` of SciPy's OpenBLAS, whose float32
  SVD loses the small singular directions of steep spectra (512^2, s_i = i^-3, error
  over the optimal truncation at ranks 100 / 128 / 150: 1.19 / 1.57 / 2.09; its ``gesvd``,
  `jax.lax.linalg.SvdAlgorithm.QR`: 1.003 / 1.011 / 1.026; float64 LAPACK, cast back to
  float32: 1.0000 / 1.0001 / 1.0002, the floor that float32 factors allow).
  """
  if xp is np:
    return np.linalg.svd(a, full_matrices=False)
  return jax.lax.platform_dependent(a, cpu=_cpu_svd, default=_xla_svd)


_BATCH_SHARDING: contextvars.ContextVar = contextvars.ContextVar("svd_batch_sharding", default=None)


@contextlib.contextmanager
def batch_sharding(mesh, axes: tuple[str, ...]):
  """While tracing within this context, `thin_svd`'s CPU callback runs per device
  (`jax.shard_map` over every axis of ``mesh``): the leading (batch) axis of each
  matrix batch split over ``axes``, the rest of each matrix whole on every device, as
  XLA's own SVD has it. (A callback in an automatically partitioned program runs on
  one device, everything gathered there.) The sharded executor traces its stages in it."""
  token = _BATCH_SHARDING.set((mesh, tuple(axes)))
  try:
    yield
  finally:
    _BATCH_SHARDING.reset(token)


def _cpu_svd(a):
  where = _BATCH_SHARDING.get()
  if where is None:
    return _callback_svd(a)
  mesh, axes = where
  spec = P(axes or None)
  return jax.shard_map(_callback_svd, mesh=mesh, in_specs=spec, out_specs=(spec,) * 3,
                       check_vma=False)(a)


def _xla_svd(a):
  return tuple(jnp.linalg.svd(a, full_matrices=False))


def _callback_svd(a):
  m, n = a.shape[-2:]
  k = min(m, n)
  out = (jax.ShapeDtypeStruct((*a.shape[:-2], m, k), a.dtype),
         jax.ShapeDtypeStruct((*a.shape[:-2], k), a.dtype),
         jax.ShapeDtypeStruct((*a.shape[:-2], k, n), a.dtype))
  return jax.pure_callback(host_svd, out, a, vmap_method="expand_dims")


def host_svd(a):
  """NumPy's thin SVD of ``a`` in float64, cast back to ``a``'s dtype; a slice LAPACK
  cannot decompose (non-finite entries) gets NaNs, as XLA's SVD returns."""
  a = np.asarray(a)
  x = a.astype(np.float64)
  try:
    out = np.linalg.svd(x, full_matrices=False)
  except np.linalg.LinAlgError:
    flat = x.reshape(-1, *x.shape[-2:])
    k = min(x.shape[-2:])
    parts = [np.full((len(flat), x.shape[-2], k), np.nan), np.full((len(flat), k), np.nan),
             np.full((len(flat), k, x.shape[-1]), np.nan)]
    for i, one in enumerate(flat):
      try:
        for part, y in zip(parts, np.linalg.svd(one, full_matrices=False)):
          part[i] = y
      except np.linalg.LinAlgError:
        pass
    out = [p.reshape(*x.shape[:-2], *p.shape[1:]) for p in parts]
  return tuple(np.asarray(y, a.dtype) for y in out)
