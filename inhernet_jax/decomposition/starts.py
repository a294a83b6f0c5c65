"""Start matrices of the randomized SVD (`svd.randomized_svd`): packed random signs.

Split from `inhernet_jax.decomposition.svd` (which re-exports every name here).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def compute_dtype() -> jnp.dtype:
  """float64 when ``jax_enable_x64`` is on, else float32 (as `svd.compute_dtype`)."""
  return jnp.result_type(float)


# Start matrices are random signs (Rademacher: as good a start for the range finder
# as Gaussian, measured in the README), drawn as packed bits with NumPy from integer
# seeds: the host, jitted, accelerator and sharded paths get the same numbers without
# compiling a generator (jax.random's threefry took 0.7-1.2 s to compile on the CPU,
# most of a cold call), and devices receive 1 bit per entry and unpack it themselves.
def start_seed(key) -> tuple[int, ...]:
  """The integer words of a concrete PRNG key (``None``: ``(0,)``), the root of every
  start matrix's seed."""
  if key is None:
    return (0,)
  with jax.ensure_compile_time_eval():  # A concrete key closed over by a jit trace.
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return tuple(int(w) for w in np.ravel(np.asarray(data)))


def packed_bytes(rows: int, k: int) -> int:
  """Bytes of one packed ``rows x k`` start matrix."""
  return -(-rows * k // 8)


def start_bits(seeds: Sequence[Sequence[int]], rows: int, k: int) -> np.ndarray:
  """Packed start matrices ``(len(seeds), packed_bytes(rows, k))`` uint8: matrix ``i``
  from NumPy's default generator seeded with ``seeds[i]`` (its own stream: a matrix's
  start does not depend on what it is batched with)."""
  out = np.empty((len(seeds), packed_bytes(rows, k)), np.uint8)
  for i, seed in enumerate(seeds):
    out[i] = np.frombuffer(np.random.default_rng(list(seed)).bytes(out.shape[1]), np.uint8)
  return out


def traced_start_bits(key: jax.Array, count: int, rows: int, k: int, first=0) -> jax.Array:
  """`start_bits` for a traced key (no integers to seed NumPy with): matrix ``i`` from
  ``jax.random.bits(fold_in(key, first + i))``; other numbers, the same distribution."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(count))
  return jax.vmap(lambda kk: jax.random.bits(kk, (packed_bytes(rows, k),), jnp.uint8))(keys)


def signs(bits, rows: int, k: int, *, xp=jnp):
  """Unpacks start bits ``(..., packed_bytes(rows, k))`` into ``(..., rows, k)`` signs
  (+-1 in `compute_dtype`)."""
  lead = bits.shape[:-1]
  b = xp.unpackbits(bits, axis=-1, count=rows * k)
  return (1 - 2 * b.astype(compute_dtype())).reshape(*lead, rows, k)


def start_matrix(key: jax.Array, shape: tuple[int, ...], first=0):
  """A randomized method's sign start ``shape = (*batch, min(m, n), k)``: matrix ``i``
  of the batch seeded by ``(*start_seed(key), first + i)`` (NumPy); a traced key draws
  with `traced_start_bits`."""
  batch, (rows, k) = int(np.prod(shape[:-2])), shape[-2:]
  if isinstance(key, jax.core.Tracer):
    return signs(traced_start_bits(key, batch, rows, k, first), rows, k).reshape(shape)
  seed = start_seed(key)
  bits = start_bits([(*seed, first + i) for i in range(batch)], rows, k)
  return signs(bits, rows, k, xp=np).reshape(shape)
