"""Sharded inheritance: `inherit` on a teacher sharded over a device mesh.

Teachers too big for one device (or the host) arrive as jax.Arrays sharded over a mesh.
Each factorised kernel is then decomposed on its own by a few jitted stages whose inputs
keep the teacher's sharding and whose outputs are born with the shardings that the
sharding rules give the new params: nothing is gathered onto one device or the host,
and no kernels are concatenated. The stages follow `inherit._decompose` step by step
(same order, same random start matrices, same stopping rule), so the results equal the
host path's up to float rounding. `inherit.inherit` dispatches here; this module also
plans the per-device memory of every stage from abstract params.

Example::

  stages = inherit_sharded.sharded_stages(abstract_params, spec, mesh=mesh)
  rows = inherit_sharded.plan_memory(stages, teacher_bytes=inherit_sharded.device_bytes(abstract_params))
  max(r["peak"] for r in rows) / teacher_bytes      # < 2 for a LLaMA-7B-shaped stack
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from inhernet_jax import sharding as sharding_lib
from inhernet_jax import svd
from inhernet_jax.inherit import (
    _collect,
    _finish_group,
    _host_gate,
    _in_order,
    _is_array,
    _Kernel,
    _key_data,
    _meta,
    _note_whitening,
    _plan_all,
)
from inhernet_jax.spec import InherSpec, as_spec


# ------------------------------------------------------------------ sharded inheritance
# Teachers too big for one device (or the host) arrive as jax.Arrays sharded over a mesh.
# Each factorised kernel is then decomposed on its own by a few jitted stages whose
# inputs keep the teacher's sharding and whose outputs are born with the shardings that
# the sharding rules give the new params: nothing is gathered onto one device or the
# host, and no kernels are concatenated. The stages follow `_decompose` step by step
# (same order, same random start matrices, same stopping rule), so the results equal
# the host path's up to float rounding.


class Stage(NamedTuple):
  """One step of the sharded path, in execution order (see `sharded_stages`).

  Attributes:
    path: the '/'-joined path of the kernel it works on.
    name: ``"exact"`` (a truncated SVD and the params of one layer group),
      ``"start"`` (a group's random start matrices, drawn on the host and placed),
      ``"gram"`` (a group's Gram matrices), ``"init"`` / ``"step"`` (the randomized
      method's subspace iteration: `svd.CHECK_EVERY` power iterations per step; a gram
      and a step per group of every kernel of a bucket make a round, repeated until
      the Ritz values of all of them settle), ``"finalize"`` (a group's params),
      ``"assemble"`` (a kernel's params from its groups'), ``"gate"`` (the gate, drawn
      on the host and placed).
    fn: the jitted function (``fn.lower(*args).compile()`` works on abstract args), or
      for host stages a function of no arguments that returns the placed arrays.
    inputs: labels of the arguments: ``"kernel:PATH"``, ``"bias:PATH"`` (the teacher's),
      ``"index:G"`` (a group index), per group ``"start:PATH#G"``, ``"gram:PATH#G"``,
      ``"state:PATH#G"`` (bases, Ritz values, change), ``"part:PATH#G"``.
    output: label of the result (``"params:PATH"``, ``"gate:PATH"``, ...).
    frees: labels whose arrays are dropped after this stage.
    args: the arguments (abstract in `sharded_stages`, concrete when traced).
    abstract: the result's `jax.ShapeDtypeStruct` pytree (host stages, and every
      stage `sharded_stages` lists).
  """

  path: str
  name: str
  fn: Callable
  inputs: tuple = ()
  output: str = ""
  frees: tuple = ()
  args: tuple = ()
  abstract: Any = None


class _Round(NamedTuple):
  """One lockstep round: a ``"gram"`` and a ``"step"`` stage per group of every kernel
  of a bucket."""

  stages: tuple


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where one kernel's work lives (all `NamedSharding`s of one mesh).

  A stacked kernel's ``B`` slices are split over the mesh axes whose device count
  ``D`` divides ``B`` (the most devices possible; the rest of the mesh holds copies)
  and worked on in ``G = B / D`` groups of ``D`` consecutive slices, one jitted call
  per group: moving a slice off the teacher's sharding onto one device costs a copy of
  it (and XLA's all-to-all some more), so only one slice per device moves at once.
  (A loop over groups inside one program would not do: XLA hoists a cast or a layout
  copy of the whole kernel out of it.) A group's work arrays are ``(D, ...)``: Gram
  matrices ``(D, s, s)``, bases ``(D, s, k)``. Unstacked kernels and stacks no mesh
  axis divides (on one device: every stack) go one slice at a time (``D = 1``),
  keeping the teacher's sharding; Gram matrices and bases are split over their rows.
  """

  groups: int  # G
  stack: tuple[str, ...]  # Mesh axes of a group's D slices (empty: one slice).
  matrices: NamedSharding | None  # A group's (D, m, n); None: as the teacher's.
  basis: NamedSharding  # A group's Gram matrices (D, s, s) and bases (D, s, k).
  values: NamedSharding  # Ritz values (D, rank).
  replicated: NamedSharding


def _dividing_axes(mesh: Mesh, size: int) -> tuple[str, ...]:
  """The mesh axes (of size > 1) with the largest device count that divides ``size``."""
  names = [a for a in mesh.axis_names if mesh.shape[a] > 1]
  best, most = (), 1
  for count in range(1, len(names) + 1):
    for axes in itertools.combinations(names, count):
      devices = int(np.prod([mesh.shape[a] for a in axes]))
      if size % devices == 0 and devices > most:
        best, most = axes, devices
  return best


@functools.lru_cache(maxsize=None)
def _layout(mesh: Mesh, batch: int, size: int) -> _Layout:
  def named(*spec):
    return NamedSharding(mesh, P(*spec))

  stack = _dividing_axes(mesh, batch) if batch > 1 else ()
  if stack:
    groups = batch // int(np.prod([mesh.shape[a] for a in stack]))
    return _Layout(groups, stack, named(stack, None, None), named(stack, None, None),
                   named(stack, None), named())
  rows = _dividing_axes(mesh, size) or None
  return _Layout(batch, (), None, named(None, rows, None), named(), named())


def _via(k: _Kernel, layout: _Layout) -> tuple[NamedSharding, ...]:
  """Shardings on the way from the kernel's to ``layout.matrices``, for one group
  ``(D, *in_shape, out)``: step ``i`` moves stack axis ``i`` onto the first axis (the
  other axes give it up). Each step is a local slice or an all-to-all over one mesh
  axis, and the last constraint an all-gather; XLA's partitioner turns a direct
  resharding (say from ``fsdp`` on the output axis to ``data`` on the stack axis, or
  two axes at once) into a gather of the whole group onto every device."""
  placed = getattr(k.kernel, "sharding", None)
  if not layout.stack or not isinstance(placed, NamedSharding):
    return ()
  spec = tuple(placed.spec) + (None,) * (k.kernel.ndim - len(placed.spec))
  steps = []
  for i in range(1, len(layout.stack) + 1):
    moved, rest = layout.stack[:i], []
    for entry in spec[k.stack :]:
      names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
      rest.append(tuple(a for a in names if a not in moved) or None)
    steps.append(NamedSharding(placed.mesh, P(moved, *rest)))
  return tuple(steps)


def _constrain(x, sharding):
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _leave_stack(x, layout: _Layout, target: NamedSharding):
  """``x`` (a group's ``(D, ...)``, split over the stack axes) on its way to ``target``
  (``P(None, ...)``): one stack axis given back at a time, as `_via` takes them."""
  if not layout.stack:
    return x
  rest = tuple(target.spec)[1:] + (None,) * (x.ndim - len(target.spec))
  for i in reversed(range(len(layout.stack))):
    kept, entries = layout.stack[:i], []
    for entry in rest:
      names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
      entries.append(tuple(a for a in names if a not in kept) or None)
    x = _constrain(x, NamedSharding(target.mesh, P(kept or None, *entries)))
  return x


def _group(x, index, groups: int, tail: tuple):
  """Group ``index`` (traced: one program serves all groups) of the stack of ``x``
  (``(*stack, *tail)``): ``(D, *tail)``."""
  return jax.lax.dynamic_index_in_dim(x.reshape(groups, -1, *tail), index, 0, keepdims=False)


def _matrices(kernel, index, in_shape, n, layout, via):
  """Group ``index`` of a kernel as matrices ``(D, m, n)``, split over the stack axes."""
  group = _group(kernel, index, layout.groups, (*in_shape, n))
  for sharding in via:
    group = _constrain(group, sharding)
  return _constrain(group.reshape(-1, int(np.prod(in_shape)), n), layout.matrices)


def _ritz(g, q, rank):
  """`svd.subspace`'s Ritz values and their convergence scale (the same expressions)."""
  k = q.shape[-1]
  w = jnp.linalg.eigvalsh(jnp.swapaxes(q, -1, -2) @ g @ q)[..., k - rank :]
  floor = 100 * np.finfo(g.dtype).eps * w[..., -1:]
  return w, jnp.maximum(jnp.abs(w), floor)


# The stages, each jitted once per (statics, output shardings) by `_jit`. The subspace
# iteration (init, step) takes Gram matrices, so every kernel with the same Gram size
# and layout shares one program (QR programs are slow to compile); the Gram matrices
# are recomputed for every step rather than kept, so that a bucket's lockstep holds
# only its bases (B, s, k), never the Gram matrices (B, s, s) of all its kernels.
def _gram_stage(kernel, index, *, in_shape, n, layout, via):
  a = _matrices(kernel, index, in_shape, n, layout, via).astype(svd.compute_dtype())
  return _constrain(svd.gram(a), layout.basis)


def _init_stage(g, start, *, rank, layout):
  q = _constrain(svd._householder_q(start), layout.basis)
  return q, _ritz(g, q, rank)[0], jnp.asarray(np.inf, g.dtype)


def _step_stage(g, state, *, rank, layout):
  def power(_, q):
    return _constrain(svd._householder_q(g @ q), layout.basis)

  q, w, _ = state
  q = jax.lax.fori_loop(0, svd.CHECK_EVERY, power, q)
  w_new, scale = _ritz(g, q, rank)
  return q, w_new, jnp.max(jnp.abs(w_new - w) / scale)


def _finalize_stage(kernel, bias, state, index, *, meta, layout, via, parts, keep_factors):
  return _part(kernel, bias, state[0], index, meta, layout, via, parts, keep_factors)


def _exact_stage(kernel, bias, index, *, meta, layout, via, parts, keep_factors):
  return _part(kernel, bias, None, index, meta, layout, via, parts, keep_factors)


def _whitened_stage(kernel, bias, gram, index, *, meta, layout, via, parts, keep_factors, damping):
  """A data-aware group: `svd.whitened_svd` with the group's per-row Grams, plus
  whether each slice's Cholesky succeeded (last output)."""
  return _part(kernel, bias, None, index, meta, layout, via, parts, keep_factors, gram, damping)


def _part(kernel, bias, q, index, meta, layout, via, parts, keep_factors, gram=None, damping=0.0):
  """One group's params (``down/kernel``, ``up/kernel``, [``up/bias``]) from its bases
  ``q`` (randomized), a whitened SVD (``gram``: the kernel's per-row input Grams
  ``(B, m, m)``; then also the slices' Cholesky success, last) or an SVD, and
  (``keep_factors``) its ``u, s, v``; ``parts``: their shardings."""
  _, in_shape, n, rank, heads, dtype = meta
  a = _matrices(kernel, index, in_shape, n, layout, via)
  meta = ((a.shape[0],), in_shape, n, rank, heads, dtype)
  bias = None if bias is None else _group(bias, index, layout.groups, (n,))
  ok = ()
  if gram is not None:
    m = a.shape[-2]
    u, s, v, whitened = svd.whitened_svd(a, _group(gram, index, layout.groups, (m, m)), rank,
                                         damping, xp=jnp)
    [(factors, params)] = _finish_group(u, s, v, (bias,), (meta,), None, 0, xp=jnp)
    ok = (whitened,)
  elif q is None:
    u, s, v = svd.exact_svd(a, rank)
    [(factors, params)] = _finish_group(u, s, v, (bias,), (meta,), None, 0, xp=jnp)
  else:
    a = a.astype(svd.compute_dtype())
    [(factors, params)] = _finish_group(a, None, q, (bias,), (meta,), "finalize", 0, xp=jnp)
  up = params["up"]
  params = (params["down"]["kernel"], up["kernel"]) + ((up["bias"],) if "bias" in up else ())
  params = tuple(_leave_stack(x, layout, target) for x, target in zip(params, parts))
  return params + (factors if keep_factors else ()) + ok


def _assemble_stage(*parts, stack_shape, count):
  """The groups' parts, concatenated along the stack: the first ``count`` are params
  (``(*stack_shape, ...)``), the rest factors (``(B, ...)``)."""
  out = [jnp.concatenate(xs) for xs in zip(*parts)]
  return tuple(x.reshape(*stack_shape, *x.shape[1:]) for x in out[:count]) + tuple(out[count:])


def _singular_values_stage(kernel, index, *, in_shape, n, layout, via):
  return (svd.singular_values(_matrices(kernel, index, in_shape, n, layout, via)),)


@functools.lru_cache(maxsize=None)
def _jit(fn, out_shardings, **statics):
  """One jitted stage per (statics, output shardings): same-shaped kernels share it
  (and jit's own cache holds one executable per input sharding)."""
  return jax.jit(functools.partial(fn, **statics), out_shardings=out_shardings)


def _sharded_mesh(kernels: list[_Kernel], mesh: Mesh | None) -> Mesh | None:
  """The mesh of the sharded path: ``mesh``, or the one the kernels are sharded over;
  None (the single-device paths) when no kernel spans several devices."""
  live = [k for k in kernels if k.plan is None]
  if mesh is not None:
    if not isinstance(mesh, Mesh):
      raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if any(isinstance(k.kernel, jax.core.Tracer) for k in live):
      raise ValueError("inherit(mesh=...) runs outside jit (it calls jitted stages itself)")
    return mesh
  for k in live:
    placed = getattr(k.kernel, "sharding", None)
    if isinstance(k.kernel, jax.core.Tracer) or placed is None or len(placed.device_set) < 2:
      continue
    if not isinstance(placed, NamedSharding):
      raise ValueError(
          f"{k.path}: sharded over {len(placed.device_set)} devices by a "
          f"{type(placed).__name__}; pass inherit(mesh=...) to say which mesh to use")
    if mesh is None:
      mesh = placed.mesh
    elif placed.mesh != mesh:
      raise ValueError(f"{k.path}: kernels are sharded over different meshes; pass "
                       "inherit(mesh=...) to choose one")
  return mesh


def _place(x, mesh: Mesh, path: str, rules):
  """``x`` on ``mesh``: as it is when already there, else sharded by the rules (a host
  array is sliced per device, never gathered anywhere)."""
  placed = getattr(x, "sharding", None)
  if x is None or (isinstance(placed, NamedSharding) and placed.mesh == mesh):
    return x
  target = NamedSharding(mesh, sharding_lib.partition_spec(mesh, path, x.shape, rules))
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target)
  return sharding_lib.put(x, target)


def _place_all(kernels: list[_Kernel], mesh: Mesh, rules) -> None:
  for k in kernels:
    if k.plan is None:
      prefix = "/".join(k.keys)
      k.kernel = _place(k.kernel, mesh, k.path, rules)
      k.bias = _place(k.bias, mesh, f"{prefix}/bias", rules) if _is_array(k.bias, True) else None


def _sharded_singular_values(k: _Kernel, mesh: Mesh) -> np.ndarray:
  """All singular values of every slice of a kernel, group by group."""
  layout = _layout(mesh, int(np.prod(k.stack_shape)), min(k.m, k.n))
  fn = _jit(_singular_values_stage, (layout.replicated,), in_shape=k.in_shape, n=k.n,
            layout=layout, via=_via(k, layout))
  indices = [jax.device_put(np.int32(g), layout.replicated) for g in range(layout.groups)]
  return np.concatenate([np.asarray(fn(k.kernel, index)[0]) for index in indices])


def _start_rng(key, size: int, rank: int) -> np.random.Generator:
  """The NumPy generator `svd.subspace` draws a bucket's start matrices from."""
  bucket_key = jax.random.fold_in(jax.random.key(0) if key is None else key, size * 100003 + rank)
  return np.random.default_rng([int(w) for w in np.ravel(_key_data(bucket_key))])


def _draw_start(rng, shape, sharding):
  """The next ``shape`` standard normals of ``rng`` (one matrix at a time, the same
  stream as one big draw), in `svd.compute_dtype`, placed without a gather."""
  start = np.empty(shape, svd.compute_dtype())
  for i in range(shape[0]):
    start[i] = rng.standard_normal(shape[1:])
  return sharding_lib.put(start, sharding)


def _sharded_schedule(kernels, spec: InherSpec, key, mesh: Mesh, rules, keep_factors: bool):
  """The stages of the sharded path in `_decompose`'s order: exact kernels one by one;
  then per bucket (randomized kernels with the same Gram size and rank) the start,
  Gram and init of each group of each kernel, lockstep rounds, and each kernel's
  finalize (group by group), assembly and gate. Returns ``(schedule, constants,
  sharding)``: the group indices the stages read, by label, and where they go."""
  groups: dict[Any, list[_Kernel]] = {}
  for k in _in_order(kernels):
    if k.plan.factorize:
      groups.setdefault((k.m, k.n, k.plan.rank, k.plan.data_aware), []).append(k)
  schedule, buckets = [], {}

  def rule(k, name, shape):
    return sharding_lib.partition_spec(mesh, f"{'/'.join(k.keys)}/{name}", shape, rules)

  def param_shapes(k):
    shapes = {"down/kernel": (*k.stack_shape, *k.in_shape, k.plan.rank),
              "up/kernel": (*k.stack_shape, k.plan.heads, k.plan.rank, k.n)}
    if k.bias is not None:
      shapes["up/bias"] = (*k.stack_shape, k.plan.heads, k.n)
    return shapes

  def extra(k):
    """Factors (for the report) and a data-aware kernel's Cholesky flags: replicated."""
    return (NamedSharding(mesh, P()),) * (3 * keep_factors + k.plan.data_aware)

  def part_shardings(k):
    """A group's params: the rules' sharding of their non-stack axes (assembling them
    is then a local concatenation), then `extra`."""
    out = []
    for name, shape in param_shapes(k).items():
      spec = tuple(rule(k, name, shape)) + (None,) * len(shape)
      out.append(NamedSharding(mesh, P(None, *spec[k.stack : len(shape)])))
    return tuple(out) + extra(k)

  def finish(k, layout, name, fn, frees=False):
    """The group parts (``fn`` of the kernel, its bias, [the group's subspace state],
    the group index), their assembly and the gate of kernel ``k``."""
    p, parts, stages = k.path, [f"part:{k.path}#{g}" for g in range(layout.groups)], []
    for g in range(layout.groups):
      state = (f"state:{p}#{g}",) if frees else ()
      gram = (f"gram:{p}",) if k.plan.data_aware else ()
      stages.append(Stage(p, name, fn, (f"kernel:{p}", f"bias:{p}", *gram, *state, f"index:{g}"),
                          parts[g], state))
    out = tuple(NamedSharding(mesh, rule(k, name, shape)) for name, shape in param_shapes(k).items())
    out += extra(k)
    assemble = _jit(_assemble_stage, out, stack_shape=k.stack_shape, count=len(param_shapes(k)))
    stages.append(Stage(k.path, "assemble", assemble, tuple(parts), f"params:{k.path}", tuple(parts)))
    if k.plan.heads > 1:
      shapes = {"kernel": (*k.stack_shape, k.plan.rank, k.plan.heads),
                "bias": (*k.stack_shape, k.plan.heads)}
      shardings = {name: NamedSharding(mesh, rule(k, f"gate/{name}", shape)) for name, shape in shapes.items()}
      abstract = {name: jax.ShapeDtypeStruct(shape, k.kernel.dtype, sharding=shardings[name])
                  for name, shape in shapes.items()}
      stages.append(Stage(k.path, "gate", lambda: sharding_lib.put(_host_gate(key, k), shardings),
                          output=f"gate:{k.path}", abstract=abstract))
    return stages

  most = 1
  for (m, n, rank, aware), group in groups.items():
    exact = svd.resolve_method(m, n, rank, spec.method) == "exact"
    for k in group:
      layout = _layout(mesh, int(np.prod(k.stack_shape)), min(m, n))
      most = max(most, layout.groups)
      if aware:  # Exact SVDs of L^T A, group by group, like the exact method.
        fn = _jit(_whitened_stage, part_shardings(k), meta=_meta([k])[0], layout=layout,
                  via=_via(k, layout), parts=part_shardings(k), keep_factors=keep_factors,
                  damping=spec.damping)
        schedule += finish(k, layout, "whitened", fn)
      elif exact:
        fn = _jit(_exact_stage, part_shardings(k), meta=_meta([k])[0], layout=layout,
                  via=_via(k, layout), parts=part_shardings(k), keep_factors=keep_factors)
        schedule += finish(k, layout, "exact", fn)
      else:
        size = min(m, n)
        bucket = (size, rank, min(size, rank + svd._oversample(rank, None)))
        buckets.setdefault(bucket, []).append((k, layout))
  for (size, rank, width), items in buckets.items():
    rng = _start_rng(key, size, rank)
    steps, finals = [], []
    for k, layout in items:
      p, kernel, via = k.path, f"kernel:{k.path}", _via(k, layout)
      shape = (int(np.prod(k.stack_shape)) // layout.groups, size, width)
      start = jax.ShapeDtypeStruct(shape, svd.compute_dtype(), sharding=layout.basis)
      gram = _jit(_gram_stage, layout.basis, in_shape=k.in_shape, n=k.n, layout=layout, via=via)
      state = (layout.basis, layout.values, layout.replicated)
      init = _jit(_init_stage, state, rank=rank, layout=layout)
      step = _jit(_step_stage, state, rank=rank, layout=layout)
      for g in range(layout.groups):
        at = f"{p}#{g}"
        schedule += [
            Stage(p, "start", functools.partial(_draw_start, rng, shape, layout.basis),
                  output=f"start:{at}", abstract=start),
            Stage(p, "gram", gram, (kernel, f"index:{g}"), f"gram:{at}"),
            Stage(p, "init", init, (f"gram:{at}", f"start:{at}"), f"state:{at}",
                  (f"start:{at}", f"gram:{at}")),
        ]
        steps += [Stage(p, "gram", gram, (kernel, f"index:{g}"), f"gram:{at}"),
                  Stage(p, "step", step, (f"gram:{at}", f"state:{at}"), f"state:{at}", (f"gram:{at}",))]
      final = _jit(_finalize_stage, part_shardings(k), meta=_meta([k])[0], layout=layout,
                   via=via, parts=part_shardings(k), keep_factors=keep_factors)
      finals += finish(k, layout, "finalize", final, frees=True)
    schedule += [_Round(tuple(steps)), *finals]
  # Group indices as arrays on the mesh, placed once: a host scalar would be copied to
  # every device on every call (and XLA:CPU's collectives can stall behind such copies).
  replicated = NamedSharding(mesh, P())
  return schedule, {f"index:{g}": np.int32(g) for g in range(most)}, replicated


def _call(stage: Stage, env: dict, trace) -> Any:
  """Runs one stage and waits for it: one stage at a time keeps the memory to plan
  (and XLA:CPU's collectives stall when many programs are in flight)."""
  args = tuple(env[label] for label in stage.inputs)
  env[stage.output] = out = jax.block_until_ready(stage.fn(*args))
  if trace is not None:
    trace(stage._replace(args=args))
  for label in stage.frees:
    del env[label]
  return out


def _execute(schedule, env: dict, trace=None) -> None:
  """Runs a schedule; a round repeats until `svd.subspace`'s stopping rule holds for
  the whole bucket (the largest change over its kernels, as in one batched call)."""
  for entry in schedule:
    if isinstance(entry, Stage):
      _call(entry, env, trace)
      continue
    done, change = 0, np.float32(np.inf)
    while done < svd.ITERS and change > svd.TOL:
      changes = []
      for stage in entry.stages:  # Keep only the change: the Gram matrix must go.
        out = _call(stage, env, trace)
        if stage.name == "step":
          changes.append(out[2])
      del out
      change = np.max([np.asarray(c) for c in changes])
      done += svd.CHECK_EVERY


def _teacher_env(kernels, mesh: Mesh) -> dict:
  """The stages' inputs: kernels and biases, and data-aware kernels' per-row input Grams
  ``(B, m, m)`` (replicated; abstract when planning without them)."""
  env = {}
  replicated = NamedSharding(mesh, P())
  for k in kernels:
    if k.plan.factorize:
      env[f"kernel:{k.path}"], env[f"bias:{k.path}"] = k.kernel, k.bias
    if k.plan.factorize and k.plan.data_aware:
      shape = (int(np.prod(k.stack_shape)), k.m, k.m)
      if k.gram is None:
        env[f"gram:{k.path}"] = jax.ShapeDtypeStruct(shape, svd.compute_dtype(), sharding=replicated)
      else:
        gram, count = (np.asarray(x, np.float64) for x in k.gram)
        per_row = (gram / count[..., None, None]).reshape(shape).astype(svd.compute_dtype())
        env[f"gram:{k.path}"] = jax.device_put(per_row, replicated)
  return env


def _decompose_sharded(kernels, spec, key, mesh, rules, keep_factors=True, trace=None) -> None:
  """`_decompose` for sharded teachers (see the section comment): kernel by kernel."""
  if isinstance(key, jax.core.Tracer):
    raise ValueError("inherit(mesh=...) needs a concrete key (it runs outside jit)")
  schedule, constants, replicated = _sharded_schedule(kernels, spec, key, mesh, rules, keep_factors)
  env = {**_teacher_env(kernels, mesh), **jax.device_put(constants, replicated)}
  _execute(schedule, env, trace)
  for k in kernels:
    if not k.plan.factorize:
      continue
    out = env.pop(f"params:{k.path}")
    if k.plan.data_aware:
      _note_whitening([k], np.asarray(out[-1]), spec.damping)
      out = out[:-1]
    k.params = {"down": {"kernel": out[0]}, "up": {"kernel": out[1]}}
    if k.bias is not None:
      k.params["up"]["bias"] = out[2]
    if keep_factors:
      k.factors = out[-3:]
    if k.plan.heads > 1:
      k.params["gate"] = env.pop(f"gate:{k.path}")


def sharded_stages(
    params,
    rank: int | float | InherSpec,
    *,
    heads: int | None = None,
    rules=(),
    key: jax.Array | None = None,
    mesh: Mesh | None = None,
    sharding_rules=None,
    keep_factors: bool = False,
) -> list[Stage]:
  """The stages `inherit` runs on a sharded teacher, with abstract arguments.

  For planning memory without allocating anything: ``params`` may hold
  `jax.ShapeDtypeStruct` leaves (with shardings; leaves without one are placed by the
  rules). Every jitted stage's ``fn.lower(*args).compile().memory_analysis()`` gives its
  per-device argument, output and temp bytes. A lockstep round appears once (each
  further round has the same footprint). The energy policy needs values: `resolve`
  first.
  """
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      params)
  spec = as_spec(rank, heads, rules)
  kernels = _collect(abstract, spec, abstract=True)
  rules = sharding_lib.resolve_rules(sharding_rules)
  mesh = _sharded_mesh(kernels, mesh)
  if mesh is None:
    raise ValueError("sharded_stages: no kernel is sharded over several devices; pass mesh=")
  _place_all(kernels, mesh, rules)
  _plan_all(kernels, spec, mesh)
  schedule, constants, replicated = _sharded_schedule(kernels, spec, key, mesh, rules, keep_factors)
  env = _teacher_env(kernels, mesh)
  env.update({label: jax.ShapeDtypeStruct((), np.int32, sharding=replicated) for label in constants})
  out = []
  for entry in schedule:
    for stage in entry.stages if isinstance(entry, _Round) else (entry,):
      args = tuple(env[label] for label in stage.inputs)
      if stage.abstract is None:
        stage = stage._replace(abstract=jax.eval_shape(stage.fn, *args))
      env[stage.output] = stage.abstract
      out.append(stage._replace(args=args))
  return out


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
  if stage.name in ("start", "gate"):
    return 0
  args = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      stage.args)
  return _compiled_temp_bytes(stage.fn, args)


def plan_memory(stages: list[Stage], teacher_bytes: int) -> list[dict]:
  """The per-device memory of `sharded_stages`' schedule, stage by stage.

  Each row: ``live`` (the teacher's ``teacher_bytes`` plus every array alive before the
  stage: new params so far, bases of the bucket, the stage's inputs), ``out`` (what it
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
