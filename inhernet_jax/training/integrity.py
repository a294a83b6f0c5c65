"""What a checkpoint is, and that it is what was saved: checksums and run fingerprints.

Two checks guard a resumed run (`checkpoint.restore_latest`):

* `checksum`: a 64-bit position-weighted sum of every leaf's bits (two 32-bit sums with
  odd weights), computed by one jitted reduction on whatever mesh holds the arrays (in
  NumPy when every leaf is on the host CPU: the same integers, without compiling a
  reduction for every new tree), so the same values give the same checksum on any mesh
  or number of processes. A single
  flipped bit always changes it (the weight of every element is odd); any other damage
  goes unnoticed with probability about 2**-64 per leaf. Recorded with each save,
  verified after each restore.
* `fingerprint`: everything that defines a run (optimizer, epochs, seed, loss, model
  and spec, teacher, data), flattened to ``"a.b.c" -> JSON value``. A checkpoint of
  another run (another learning rate, fewer epochs, another teacher) is refused with
  `fingerprint_diff`'s list of fields, instead of resuming silently.

Example:
  ```python
  sums = integrity.checksum(state_dict)            # {"params/conv/kernel": "9f...", ...}
  assert not integrity.nonfinite(state_dict)       # {"params/head/bias": 3} if NaN/Inf
  bad = integrity.mismatched(sums, integrity.checksum(restored))   # [] when intact
  fp = integrity.fingerprint(epochs=3, optimizer={"name": "adam", "learning_rate": 1e-3})
  print(integrity.fingerprint_diff(saved_fp, fp))  # "  epochs: checkpoint 3, now 5"
  ```
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from inhernet_jax.common import utils

# Two odd 32-bit multipliers (golden ratio and a Murmur3 constant): element i weighs
# (i * A) | 1, an odd number, so flipping any one bit changes the sum modulo 2**32.
_MULTIPLIERS = (0x9E3779B1, 0xCC9E2D51)
ALGORITHM = "possum64-v1"  # Recorded with the sums: another algorithm is not compared.


def _bits(x) -> jax.Array:
  """The leaf's raw bits as uint32 (one value per element, two for 64-bit types)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _position(shape) -> jax.Array:
  """Row-major element index (mod 2**32) without a reshape (keeps any sharding)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in range(len(shape) - 1, -1, -1):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _sums_impl(leaves):
  out = []
  for x in leaves:
    bits = _bits(x)
    position = _position(bits.shape)
    out.append(jnp.stack([
        jnp.sum(bits * ((position * jnp.uint32(m)) | jnp.uint32(1)), dtype=jnp.uint32)
        for m in _MULTIPLIERS]))
  return out


@functools.lru_cache(maxsize=64)
def _sums_fn(out_sharding):
  # Replicated scalars: every process can read them (arrays may span processes).
  return jax.jit(_sums_impl, out_shardings=out_sharding)


def _replicated(leaves):
  for x in leaves:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return None


def _on_host(leaves) -> bool:
  """Every leaf a NumPy value or a jax array whole on this process's CPU devices."""
  for x in leaves:
    if isinstance(x, jax.Array):
      if not x.is_fully_addressable or any(d.platform != "cpu" for d in x.devices()):
        return False
  return True


def _host_bits(x) -> np.ndarray:
  """`_bits` in NumPy: the same uint32 values, in row-major order."""
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = np.asarray(x)
  if x.dtype == np.bool_:
    return x.astype(np.uint32)
  size = x.dtype.itemsize
  if size == 8:  # Little-endian words, as lax.bitcast_convert_type orders them.
    return np.ascontiguousarray(x).view("<u4").reshape(*x.shape, 2)
  return np.ascontiguousarray(x).view({1: np.uint8, 2: "<u2", 4: "<u4"}[size]).astype(np.uint32)


def _host_sums(leaves) -> list[np.ndarray]:
  """`_sums_impl` in NumPy (uint32 arithmetic wraps modulo 2**32, as XLA's does)."""
  out = []
  for x in leaves:
    bits = _host_bits(x).reshape(-1)
    position = (np.arange(bits.size, dtype=np.uint64) & 0xFFFFFFFF).astype(np.uint32)
    out.append(np.array([np.sum(bits * ((position * np.uint32(m)) | np.uint32(1)),
                                dtype=np.uint32) for m in _MULTIPLIERS]))
  return out


def checksum(tree) -> dict[str, str]:
  """``path -> "dtype shape hex"`` for every array leaf of ``tree`` (other leaves skipped).

  Arrays may be jax (any sharding) or NumPy; the result depends only on their values,
  dtypes and shapes.
  """
  flat = [(p, x) for p, x in utils.flatten_with_names(tree)
          if hasattr(x, "dtype") and hasattr(x, "shape")]
  # NumPy leaves as jax would hold them (float64 -> float32 without x64, say).
  leaves = [jnp.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x for _, x in flat]
  if not flat:
    sums = []
  elif _on_host(leaves):
    sums = _host_sums(leaves)
  else:
    sums = jax.device_get(_sums_fn(_replicated(leaves))(leaves))
  return {p: f"{x.dtype} {tuple(x.shape)} {int(s[0]):08x}{int(s[1]):08x}"
          for (p, x), s in zip(flat, sums)}


def _count_nonfinite(leaves):
  return [jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves]


@functools.lru_cache(maxsize=64)
def _nonfinite_fn(out_sharding):
  return jax.jit(_count_nonfinite, out_shardings=out_sharding)


def nonfinite(tree) -> dict[str, int]:
  """``path -> count`` of the NaN/Inf values of every floating leaf of ``tree`` that has
  any (empty when all are finite); jax (any sharding) or NumPy leaves."""
  flat = [(p, x) for p, x in utils.flatten_with_names(tree)
          if hasattr(x, "dtype") and hasattr(x, "shape")
          and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not flat:
    return {}
  leaves = [jnp.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x for _, x in flat]
  if _on_host(leaves):
    counts = [int(np.sum(~np.isfinite(np.asarray(x, np.float32) if x.dtype.itemsize < 4
                                      else np.asarray(x)))) for x in leaves]
  else:
    counts = jax.device_get(_nonfinite_fn(_replicated(leaves))(leaves))
  return {p: int(c) for (p, _), c in zip(flat, counts) if int(c)}


def mismatched(saved: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
  """Paths whose checksums differ, or that only one side has (sorted)."""
  return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def digest(value: Any) -> str:
  """sha256 of a JSON value (sorted keys), hex."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any):
  """JSON-able and comparable: tuples -> lists, ConfigDicts/Mappings -> dicts, the rest
  by ``repr`` without memory addresses (so that it is the same in every process).

  Not `utils.jsonable`: this never fails and keeps arrays and objects as their ``repr``
  (a fingerprint names a run, it does not store data), and saved checkpoints' digests
  depend on exactly this form.
  """
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def fingerprint(**fields) -> dict[str, Any]:
  """A flat ``"a.b" -> value`` dict of the run-defining ``fields`` (nested dicts flattened).

  Values are made JSON-able (`_plain`); a long text (a model's repr) is replaced by its
  sha256 so that the fingerprint stays small.
  """
  out: dict[str, Any] = {}

  def visit(prefix, value):
    if isinstance(value, Mapping) and value:
      for k in sorted(value):
        visit(f"{prefix}.{k}" if prefix else str(k), value[k])
    else:
      if isinstance(value, str) and len(value) > 200:
        value = "sha256:" + hashlib.sha256(value.encode()).hexdigest()
      out[prefix] = value

  visit("", _plain(fields))
  return out


def _short(value: Any, limit: int = 60) -> str:
  text = "(absent)" if value is _ABSENT else json.dumps(value, default=str)
  return text if len(text) <= limit else text[:limit - 3] + "..."


_ABSENT = object()


def fingerprint_diff(saved: Mapping[str, Any], now: Mapping[str, Any],
                     allow: tuple[str, ...] = ()) -> list[str]:
  """``"  field: checkpoint X, now Y"`` for every field that differs and is not allowed.

  ``allow``: field names (or prefixes: ``"optimizer"`` allows ``optimizer.learning_rate``)
  that may differ; ``"*"`` allows everything.
  """
  if "*" in allow:
    return []
  lines = []
  for key in sorted(set(saved) | set(now)):
    a, b = saved.get(key, _ABSENT), now.get(key, _ABSENT)
    if a == b and type(a) is type(b):
      continue
    if any(key == p or key.startswith(p + ".") for p in allow):
      continue
    lines.append(f"  {key}: checkpoint {_short(a)}, now {_short(b)}")
  return lines


__all__ = ["ALGORITHM", "checksum", "digest", "fingerprint", "fingerprint_diff", "mismatched",
           "nonfinite"]
