"""The LLaMA-style teacher `benchmarks.memory` inherits, and how its runs are measured.

`Shape` and `param_shapes` give the stack's params (abstract), `sharded` places them on a
mesh by sharding rules, `random_teacher` / `power_law` fill them in (born sharded, or
with singular values ``1/i``), `spec` is the `InherSpec` the benchmark inherits with;
`bytes_per_device` and `timed_inherit` measure a run.

Example:
  ```python
  abstract = sharded(param_shapes(Shape(layers=2, width=64, mlp=160, vocab=100),
                                  jnp.float32), mesh, "default")
  out, seconds = timed_inherit(random_teacher(abstract), spec(rank=16, heads=2))
  ```
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Shape:
  """A LLaMA-style stack; the defaults are LLaMA-2-7B's."""

  layers: int = 32
  width: int = 4096
  mlp: int = 11008
  vocab: int = 32000


def param_shapes(shape: Shape, dtype) -> dict:
  """The teacher's params as `jax.ShapeDtypeStruct`s (via `jax.eval_shape`)."""
  import jax
  import jax.numpy as jnp

  def init():
    def kernel(*dims):
      return {"kernel": jnp.zeros(dims, dtype)}

    lw, w, f = (shape.layers, shape.width), shape.width, shape.mlp
    blocks = {
        "attn": {name: kernel(*lw, w) for name in ("query", "key", "value", "out")},
        "mlp": {"fc1": kernel(*lw, f), "fc1_gate": kernel(*lw, f), "fc2": kernel(shape.layers, f, w)},
        "norm1": {"scale": jnp.ones(lw, dtype)},
        "norm2": {"scale": jnp.ones(lw, dtype)},
    }
    return {"embed": {"embedding": jnp.zeros((shape.vocab, w), dtype)}, "blocks": blocks,
            "norm": {"scale": jnp.ones((w,), dtype)}, "head": kernel(w, shape.vocab)}

  return jax.eval_shape(init)


def spec(rank: int, heads: int):
  from inhernet_jax import InherSpec

  # No biases: a rule says the blocks' kernels have one leading layer axis.
  return InherSpec(rank=rank, heads=heads, rules=((r"blocks/.*/kernel", {"stack": 1}),))


def sharded(shapes, mesh, rules):
  import jax
  from inhernet_jax.parallel import sharding

  shardings = sharding.tree_shardings(mesh, shapes, rules)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def random_teacher(abstract, seed=0):
  """Teacher params born sharded (one jitted init per leaf: no host copy, and the
  init's own temporaries stay one leaf's worth)."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  flat = traverse_util.flatten_dict(abstract, sep="/")
  out = {}
  for i, (path, leaf) in enumerate(sorted(flat.items())):
    fan_in = leaf.shape[-2] if path.endswith("kernel") else 1
    scale = 1.0 / float(fan_in) ** 0.5

    def init(key, leaf=leaf, scale=scale):
      return (jax.random.normal(key, leaf.shape, jnp.float32) * scale).astype(leaf.dtype)

    out[path] = jax.jit(init, out_shardings=leaf.sharding)(jax.random.key(seed * 1000 + i))
  return traverse_util.unflatten_dict(out, sep="/")


def power_law(leaf, seed=0):
  """A host array of ``leaf``'s shape whose matrices have singular values ``1/i``."""
  if len(leaf.shape) < 2:
    return np.ones(leaf.shape, leaf.dtype)
  rng = np.random.default_rng(seed)
  m, n = leaf.shape[-2:]
  k = min(m, n)
  mats = []
  for _ in range(int(np.prod(leaf.shape[:-2]))):
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    mats.append((u / np.arange(1, k + 1)) @ v.T)
  return np.stack(mats).reshape(leaf.shape).astype(leaf.dtype)


def count_params(tree) -> int:
  import jax
  import numpy as np

  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def bytes_per_device(arrays) -> int:
  from benchmarks.memory_plan import live_bytes_per_device

  return live_bytes_per_device(arrays)


def timed_inherit(teacher_params, inherit_spec, trace=None, **kwargs):
  """``(inherit(teacher_params, inherit_spec, **kwargs), seconds)``; its stages traced by
  ``trace`` when given."""
  import inhernet_jax as ij
  from inhernet_jax.decomposition.sharded import tracing

  start = time.time()
  with tracing(trace) if trace else contextlib.nullcontext():
    out = ij.inherit(teacher_params, inherit_spec, **kwargs)
    jax.block_until_ready(out)
  return out, time.time() - start
