"""Per-device memory of sharded inheritance, planned and measured (benchmarks only).

`plan_memory` walks `inherit_sharded.sharded_stages`' schedule on abstract inputs
(compiling each jitted stage for its temp bytes); `live_bytes_per_device` measures
what the devices really hold, e.g. inside an `inherit_sharded.tracing` hook.

Example:
  ```python
  stages = inherit_sharded.sharded_stages(abstract_params, spec, mesh=mesh)
  rows = plan_memory(stages, teacher_bytes=device_bytes(abstract_params))
  max(r["peak"] for r in rows) / device_bytes(abstract_params)
  ```
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from inhernet_jax.decomposition.sharded import Stage


def device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of (sharded) arrays or `jax.ShapeDtypeStruct`s,
  the most over devices (from shard shapes: nothing is read)."""
  total = 0
  for x in jax.tree.leaves(tree):
    placed = getattr(x, "sharding", None)
    shape = x.shape if placed is None else placed.shard_shape(x.shape)
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


def live_bytes_per_device(arrays) -> int:
  """The most bytes any one device holds of these (concrete) arrays, e.g.
  ``jax.live_arrays()``. Buffers are counted once: a global array and the single-device
  arrays of its shards (which `jax.live_arrays` lists too, once ``addressable_shards``
  has been read) share them."""
  per, seen = {}, set()
  for x in arrays:
    for shard in x.addressable_shards:
      buffer = (shard.device, shard.data.unsafe_buffer_pointer())
      if buffer not in seen:
        seen.add(buffer)
        per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
  return max(per.values(), default=0)


@functools.lru_cache(maxsize=None)
def _compiled_temp_bytes(fn, args) -> int:
  return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def stage_temp_bytes(stage: Stage) -> int:
  """Per-device temp bytes XLA plans for a jitted stage (0 for host stages); compiles
  each distinct (stage, argument shapes and shardings) once."""
  if stage.name == "gate":
    return 0
  args = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      stage.args)
  return _compiled_temp_bytes(stage.fn, args)


def plan_memory(stages: list[Stage], teacher_bytes: int) -> list[dict]:
  """The per-device memory of `sharded_stages`' schedule, stage by stage.

  Each row: ``live`` (the teacher's ``teacher_bytes`` plus every array alive before the
  stage: new params so far, the stage's inputs), ``out`` (what it
  makes), ``temp`` (`stage_temp_bytes`) and ``peak = live + out + temp``.
  """
  live, rows = {}, []
  for stage in stages:
    out, temp = device_bytes(stage.abstract), stage_temp_bytes(stage)
    before = teacher_bytes + sum(live.values())
    rows.append({"path": stage.path, "name": stage.name, "live": before, "out": out,
                 "temp": temp, "peak": before + out + temp})
    live[stage.output] = out
    for label in stage.frees:
      live.pop(label, None)
  return rows
