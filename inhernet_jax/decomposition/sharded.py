"""Sharded inheritance: the executor of `inherit`'s plan for teachers sharded over a mesh.

Teachers too big for one device (or the host) arrive as jax.Arrays sharded over a mesh.
Each factorised kernel is then decomposed on its own by jitted stages whose inputs keep
the teacher's sharding and whose outputs are born with the shardings that the sharding
rules give the new params: nothing is gathered onto one device or the host, and no
kernels are concatenated. A scan-stacked kernel ``(layers, in, out)`` is decomposed
batched over its layer axis, its layers split over as many mesh devices as divide
their count, one group of layers (one per device) moving off the teacher's sharding at
a time; an unstacked kernel goes whole, its work arrays split over their rows. Each
group is one jitted program (power iterations included: nothing comes back to the
host mid-way), then the groups are assembled and the gate placed.

It runs the same plan (`inhernet_jax.decomposition.plan`) as the local executors: the
same method per kernel, the same start matrices (the plan's seeds, per kernel and stack
slice) and the same per-batch math (`compute.decompose_group`), so the results equal the
local path's up to float rounding, gates bit for bit. `transform.inherit` dispatches here.

`sharded_stages` lists the stages with abstract arguments (memory planning, without
allocating anything: see ``benchmarks/memory_plan.py``); `tracing` installs a hook
called after each stage runs (memory measurements).

Example:
    ```python
    params = inherit(sharded_teacher, spec, sharding_rules="tensor_parallel")
    stages = sharded_stages(abstract_params, spec, mesh=mesh)
    ```
"""

from __future__ import annotations

import contextlib
import contextvars
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

from inhernet_jax.decomposition import assemble
from inhernet_jax.decomposition import compute
from inhernet_jax.decomposition import plan as plan_lib
from inhernet_jax.decomposition import svd
from inhernet_jax.decomposition.plan import Kernel, Plan
from inhernet_jax.decomposition.spec import InherSpec, as_spec
from inhernet_jax.parallel import sharding as sharding_lib

_TRACE: contextvars.ContextVar = contextvars.ContextVar("inherit_sharded_trace", default=None)


@contextlib.contextmanager
def tracing(fn: Callable[["Stage"], None]):
  """Within this context the sharded path calls ``fn(stage)`` after each stage runs,
  its concrete ``args`` filled in (memory measurements; see the benchmarks)."""
  token = _TRACE.set(fn)
  try:
    yield
  finally:
    _TRACE.reset(token)


class Stage(NamedTuple):
  """One step of the sharded path, in execution order (see `sharded_stages`).

  Attributes:
    path: the '/'-joined path of the kernel it works on.
    name: the `plan.Group` method of one layer group's truncated SVD and params
      (``"exact"``, ``"randomized"``: its packed start matrices unpacked on the mesh, or
      ``"whitened"``), ``"assemble"`` (a kernel's params from its groups'), ``"gate"``
      (the gate, drawn on the host and placed).
    fn: the jitted function (``fn.lower(*args).compile()`` works on abstract args), or
      for host stages a function of no arguments that returns the placed arrays.
    inputs: labels of the arguments: ``"kernel:PATH"``, ``"bias:PATH"`` (the teacher's),
      ``"index:G"`` (a group index), ``"start:PATH"`` (a randomized kernel's packed start
      matrices, `compute.start_bits`), ``"gram:PATH"`` (a data-aware kernel's per-row input
      Grams), ``"part:PATH#G"`` (a group's params).
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


def _via(k: Kernel, layout: _Layout) -> tuple[NamedSharding, ...]:
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


def _group_stage(kernel, bias, gram, bits, index, *, meta, layout, via, parts, keep_factors, method,
                 width, power_iters, damping):
  """One layer group's params (``down/kernel``, ``up/kernel``, [``up/bias``]), then
  (``keep_factors``) its ``u, s, v`` and (data-aware) whether each slice was whitened
  (its Gram finite): `compute.decompose_group` on the group's ``D`` slices, its randomized start
  matrices unpacked here (`compute.start_bits`' packed bits ``(B, bytes)``)."""
  stack, in_shape, n, rank, heads, dtype = meta
  a = _matrices(kernel, index, in_shape, n, layout, via)
  count, m = a.shape[0], a.shape[1]
  group_meta = (((count,), in_shape, n, rank, heads, dtype),)
  bias = None if bias is None else _group(bias, index, layout.groups, (n,))
  grams = None if gram is None else (_group(gram, index, layout.groups, (m, m)),)
  counts = None if gram is None else (jnp.ones((count,), svd.compute_dtype()),)
  start = None
  if method == "randomized":
    bits = _group(bits, index, layout.groups, (svd.packed_bytes(min(m, n), width),))
    start = _constrain(svd.signs(bits, min(m, n), width), layout.basis)
  with svd.batch_sharding(layout.basis.mesh, layout.stack):  # The CPU's SVD per device.
    [(factors, params)], ok = compute.decompose_group(
        (a,), (bias,), grams, counts, start, group_meta=group_meta, method=method, m=m, n=n,
        rank=rank, power_iters=power_iters, damping=damping, xp=jnp)
  up = params["up"]
  params = (params["down"]["kernel"], up["kernel"]) + ((up["bias"],) if "bias" in up else ())
  params = tuple(_leave_stack(x, layout, target) for x, target in zip(params, parts))
  return params + (factors if keep_factors else ()) + (() if ok is None else (ok,))


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


def sharded_mesh(kernels: list[Kernel], mesh: Mesh | None) -> Mesh | None:
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


def place_all(kernels: list[Kernel], mesh: Mesh, rules) -> list[Kernel]:
  """The kernels (and biases) to plan on ``mesh``: where they are when there already,
  else placed by the sharding ``rules``."""
  out = []
  for k in kernels:
    if k.plan is None:
      prefix = "/".join(k.keys)
      bias = _place(k.bias, mesh, f"{prefix}/bias", rules) if plan_lib.is_array(k.bias, True) else None
      k = dataclasses.replace(k, kernel=_place(k.kernel, mesh, k.path, rules), bias=bias)
    out.append(k)
  return out


def singular_values(k: Kernel, mesh: Mesh) -> np.ndarray:
  """All singular values of every slice of a kernel, group by group."""
  layout = _layout(mesh, int(np.prod(k.stack_shape)), min(k.m, k.n))
  fn = _jit(_singular_values_stage, (layout.replicated,), in_shape=k.in_shape, n=k.n,
            layout=layout, via=_via(k, layout))
  indices = [jax.device_put(np.int32(g), layout.replicated) for g in range(layout.groups)]
  return np.concatenate([np.asarray(fn(k.kernel, index)[0]) for index in indices])


def _check_variants(plan: Plan) -> None:
  """The sharded executor builds the paper's gated layer only (`InherSpec.variant`)."""
  other = [k.path for k in plan.factorised if k.plan.variant != "gated"]
  if other:
    variant = next(k.plan.variant for k in plan.factorised if k.plan.variant != "gated")
    raise ValueError(f"{other[0]}: the sharded executor builds only the 'gated' variant, not "
                     f"{variant!r}; inherit without a mesh (the "
                     "default executor) for the ablation variants")


def _sharded_schedule(plan: Plan, mesh: Mesh, rules, keep_factors: bool):
  """The stages of the sharded path, the plan's groups' kernels in order: per kernel, one
  stage per layer group, their assembly and the gate. Returns ``(schedule, groups)``:
  the stages, and the most layer groups of any kernel (the group indices to place)."""
  _check_variants(plan)
  schedule, most = [], 1

  def rule(k, name, shape):
    return sharding_lib.partition_spec(mesh, f"{'/'.join(k.keys)}/{name}", shape, rules)

  def param_shapes(k):
    shapes = {"down/kernel": (*k.stack_shape, *k.in_shape, k.plan.rank),
              "up/kernel": (*k.stack_shape, k.plan.heads, k.plan.rank, k.n)}
    if k.bias is not None:
      shapes["up/bias"] = (*k.stack_shape, k.plan.heads, k.n)
    return shapes

  def extra(k):
    """Factors (for the report) and a data-aware kernel's whitening flags: replicated."""
    return (NamedSharding(mesh, P()),) * (3 * keep_factors + k.plan.data_aware)

  def part_shardings(k):
    """A group's params: the rules' sharding of their non-stack axes (assembling them
    is then a local concatenation), then `extra`."""
    out = []
    for name, shape in param_shapes(k).items():
      spec = tuple(rule(k, name, shape)) + (None,) * len(shape)
      out.append(NamedSharding(mesh, P(None, *spec[k.stack : len(shape)])))
    return tuple(out) + extra(k)

  for group in plan.groups:
    for k in group.kernels:
      p = k.path
      layout = _layout(mesh, int(np.prod(k.stack_shape)), min(k.m, k.n))
      most = max(most, layout.groups)
      fn = _jit(_group_stage, part_shardings(k), meta=k.meta, layout=layout,
                via=_via(k, layout), parts=part_shardings(k), keep_factors=keep_factors,
                method=group.method, width=group.width, power_iters=group.power_iters,
                damping=group.damping)
      parts = [f"part:{p}#{g}" for g in range(layout.groups)]
      gram = f"gram:{p}" if k.plan.data_aware else "none"
      for g in range(layout.groups):
        schedule.append(Stage(p, group.method, fn,
                              (f"kernel:{p}", f"bias:{p}", gram, f"start:{p}", f"index:{g}"), parts[g]))
      out = tuple(NamedSharding(mesh, rule(k, name, shape)) for name, shape in param_shapes(k).items())
      out += extra(k)
      assemble = _jit(_assemble_stage, out, stack_shape=k.stack_shape, count=len(param_shapes(k)))
      schedule.append(Stage(p, "assemble", assemble, tuple(parts), f"params:{p}", tuple(parts)))
      if k.plan.heads > 1:
        shapes = {"kernel": (*k.stack_shape, k.plan.rank, k.plan.heads),
                  "bias": (*k.stack_shape, k.plan.heads)}
        shardings = {name: NamedSharding(mesh, rule(k, f"gate/{name}", shape))
                     for name, shape in shapes.items()}
        abstract = {name: jax.ShapeDtypeStruct(shape, k.kernel.dtype, sharding=shardings[name])
                    for name, shape in shapes.items()}
        schedule.append(Stage(p, "gate", functools.partial(_place_gate, k, shardings),
                              ("seed",), f"gate:{p}", abstract=abstract))
  return schedule, most


def _place_gate(k, shardings, key):
  return sharding_lib.put(assemble.host_gate(key, k), shardings)


def _call(stage: Stage, env: dict) -> Any:
  """Runs one stage and waits for it: one stage at a time keeps the memory to plan
  (and XLA:CPU's collectives stall when many programs are in flight)."""
  args = tuple(env[label] for label in stage.inputs)
  env[stage.output] = out = jax.block_until_ready(stage.fn(*args))
  trace = _TRACE.get()
  if trace is not None:
    trace(stage._replace(args=args))
  for label in stage.frees:
    del env[label]
  return out


def _teacher_env(plan: Plan, mesh: Mesh, abstract: bool = False) -> dict:
  """The stages' inputs: kernels and biases, randomized kernels' packed start matrices
  ``(B, bytes)``, data-aware kernels' per-row input Grams ``(B, m, m)`` (replicated;
  abstract when planning without them)."""
  replicated = NamedSharding(mesh, P())
  env = {"none": None, "seed": plan.key}
  for group in plan.groups:
    for i, k in enumerate(group.kernels):
      env[f"kernel:{k.path}"], env[f"bias:{k.path}"] = k.kernel, k.bias
      if group.method != "randomized":
        env[f"start:{k.path}"] = None
      elif abstract:
        shape = (k.layers, svd.packed_bytes(min(k.m, k.n), group.width))
        env[f"start:{k.path}"] = jax.ShapeDtypeStruct(shape, np.uint8, sharding=replicated)
      else:
        env[f"start:{k.path}"] = jax.device_put(compute.start_bits(group, i), replicated)
      if k.plan.data_aware:
        shape = (k.layers, k.m, k.m)
        if k.gram is None:
          env[f"gram:{k.path}"] = jax.ShapeDtypeStruct(shape, svd.compute_dtype(), sharding=replicated)
        else:
          gram, count = (np.asarray(x, np.float64) for x in k.gram)
          per_row = (gram / count[..., None, None]).reshape(shape).astype(svd.compute_dtype())
          env[f"gram:{k.path}"] = jax.device_put(per_row, replicated)
  return env


def decompose(plan: Plan, mesh: Mesh, rules, keep_factors=True) -> dict:
  """Runs the plan on ``mesh`` (see the module docstring), kernel by kernel:
  ``{path: assemble.Inherited}``."""
  if isinstance(plan.key, jax.core.Tracer):
    raise ValueError("inherit(mesh=...) needs a concrete key (it runs outside jit)")
  schedule, most = _sharded_schedule(plan, mesh, rules, keep_factors)
  replicated = NamedSharding(mesh, P())
  env = _teacher_env(plan, mesh)
  # Group indices as arrays on the mesh, placed once: a host scalar would be copied to
  # every device on every call (and XLA:CPU's collectives can stall behind such copies).
  env.update(jax.device_put({f"index:{g}": np.int32(g) for g in range(most)}, replicated))
  for stage in schedule:
    _call(stage, env)
  outs = {}
  for k in plan.factorised:
    out, whitened = env.pop(f"params:{k.path}"), None
    if k.plan.data_aware:
      [whitened] = assemble.note_whitening([k], np.asarray(out[-1]), plan.spec.damping)
      out = out[:-1]
    params = {"down": {"kernel": out[0]}, "up": {"kernel": out[1]}}
    if k.bias is not None:
      params["up"]["bias"] = out[2]
    if k.plan.heads > 1:
      params["gate"] = env.pop(f"gate:{k.path}")
    outs[k.path] = assemble.Inherited(params, out[-3:] if keep_factors else None, whitened)
  return outs


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
  per-device argument, output and temp bytes. The energy policy needs values:
  `resolve` first.
  """
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      params)
  spec = as_spec(rank, heads, rules)
  kernels = plan_lib.collect(abstract, spec, abstract=True)
  rules = sharding_lib.resolve_rules(sharding_rules)
  mesh = sharded_mesh(kernels, mesh)
  if mesh is None:
    raise ValueError("sharded_stages: no kernel is sharded over several devices; pass mesh=")
  kernels = place_all(kernels, mesh, rules)
  plan = plan_lib.build(kernels, spec, key=key, grams=False,
                        singular_values=lambda k: singular_values(k, mesh))
  schedule, most = _sharded_schedule(plan, mesh, rules, keep_factors)
  replicated = NamedSharding(mesh, P())
  env = _teacher_env(plan, mesh, abstract=True)
  env.update({f"index:{g}": jax.ShapeDtypeStruct((), np.int32, sharding=replicated)
              for g in range(most)})
  out = []
  for stage in schedule:
    args = tuple(env[label] for label in stage.inputs)
    if stage.abstract is None:
      stage = stage._replace(abstract=jax.eval_shape(stage.fn, *args))
    env[stage.output] = stage.abstract
    out.append(stage._replace(args=args))
  return out
