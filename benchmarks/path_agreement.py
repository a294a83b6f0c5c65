"""How closely the host, jit and sharded executors agree on flat (Gaussian) spectra.

Nearly equal singular values make singular vectors ill-conditioned, so LAPACK (host) and
XLA (jit, sharded) return truncations that differ by more than float32 rounding although
each is within the documented error of the optimum. This prints the largest relative
difference of the truncations ``down @ up`` and of the leaves, against the host path.

Example:
    ```bash
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.path_agreement
    ```
"""

import json

import jax
import numpy as np

import inhernet_jax as ij
from inhernet_jax.parallel import sharding

SHAPES = ((1024, 256), (512, 512), (256, 768), (768, 256))


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def _truncation(tree, name):
  return (np.asarray(tree[name]["down"]["kernel"], np.float64)
          @ np.asarray(tree[name]["up"]["kernel"][0], np.float64))


def agreement(rank: int = 32, seed: int = 0) -> dict:
  """Largest relative differences to the host path (sharded only with 8 devices)."""
  rng = np.random.default_rng(seed)
  params = {f"l{i}": {"kernel": rng.standard_normal(s).astype(np.float32),
                      "bias": np.zeros(s[-1], np.float32)} for i, s in enumerate(SHAPES)}
  spec = ij.InherSpec(rank=rank, heads=1)
  host = ij.inherit(params, spec)
  others = {"jit": jax.jit(lambda p: ij.inherit(p, spec))(params)}
  if len(jax.devices()) == 8:
    others["sharded"] = ij.inherit(params, spec, mesh=sharding.make_mesh({"data": 1, "model": 8}))
  out = {}
  for path, tree in others.items():
    out[f"truncation_{path}"] = max(_rel(_truncation(host, k), _truncation(tree, k)) for k in params)
    out[f"leaf_{path}"] = max(_rel(host[k][leaf]["kernel"], tree[k][leaf]["kernel"])
                              for k in params for leaf in ("down", "up"))
  return out


if __name__ == "__main__":
  print(json.dumps(agreement(), indent=1))
