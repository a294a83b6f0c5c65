"""The pytree transform: a teacher's params in, the inherited network's params out.

`inherit` walks a Flax ``params`` collection, decides per kernel (by `InherSpec`) whether
to keep or factorise it, decomposes all factorised kernels of one matrix shape together
(batched truncated SVDs, see `_decompose`), and returns a new pytree in the layout of
`InherDense` / `InherConv`. Nothing else changes: biases of kept layers, norms,
embeddings and every other leaf pass through as the same objects.

Sharded teachers (`inhernet_jax.inherit_sharded`). When the kernels are jax.Arrays
sharded over several devices (or a ``mesh`` is passed), each factorised kernel is decomposed on its own by a few jitted
stages (`Stage`; `sharded_stages` lists them with abstract arguments, to plan memory
without allocating anything). Their inputs keep the teacher's sharding, and their
outputs (``down/kernel``, ``up/kernel``, ``up/bias``) are born with the shardings that
``sharding_rules`` (`inhernet_jax.sharding`) give the new params' paths; gates are
drawn on the host and sliced onto the devices. Nothing is gathered onto one device or
the host and no kernels are concatenated: a scan-stacked kernel ``(layers, in, out)``
is decomposed batched over its layer axis, the layers split over as many mesh devices
as divide their count, one layer per device moving off the teacher's sharding at a
time, its Gram matrices and bases constrained to that split; an unstacked kernel
splits them over their rows instead (its exact SVD, if chosen, runs whole on every
device). Stages run one at a time. Peak memory per device: the teacher, the new
params made so far, the bases ``(layers, s, rank + oversample)`` of the kernels
iterated together, and one stage's output and temporaries (a few layer slices: the
all-to-all that moves them). A big teacher on one device takes this path too when
given a one-device ``mesh`` (one layer at a time).

The sharded path draws the same random start matrices (on the host, kernel by kernel)
and applies the same stopping rule (every kernel with the same Gram size and rank
iterates in lockstep until all have converged) as the single-device paths, and all
paths fix the sign of each singular pair the same way, so its results equal the
unsharded `inherit`'s up to float rounding, gates bit for bit. The energy policy runs
sharded too (only the singular values come to the host); `resolve` works on sharded
teachers alike. Data-aware kernels are decomposed group by group by exact SVDs of LᵀA
(their per-row Grams replicated on every device).

Data-aware inheritance (``InherSpec(data_aware=True)`` or a ``{"data_aware": True}``
rule): each such kernel is truncated for its output error on calibration inputs
(`svd.whitened_svd`, exact SVDs), from the per-kernel input Grams of
`inhernet_jax.calibration.input_grams` passed as ``calibration=``. Each Gram is divided by
its row count first, so the factors do not depend on how many batches were collected.

Example::

  student_params = inherit(teacher_params, 32, heads=3)
  spec = resolve(teacher_params, InherSpec(energy=0.9, heads=3))   # data-dependent ranks
  model = Model(spec=spec)                                          # matches the tree
  rows = inherit_report(teacher_params, spec)                       # one row per kernel
  # Data-aware: truncate for the output error on calibration inputs.
  grams = calibration.input_grams(teacher, variables, batches, apply_kwargs={"train": False})
  student_params = inherit(teacher_params, spec.replace(data_aware=True), calibration=grams)
  # A teacher sharded over a mesh: factors born sharded, by the tensor-parallel rules.
  student_params = inherit(sharded_teacher, spec, sharding_rules="tensor_parallel")
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict
from jax.sharding import Mesh

from inhernet_jax import sharding as sharding_lib
from inhernet_jax import svd
from inhernet_jax.layers import gate_kernel_init
from inhernet_jax.spec import InherSpec, LayerPlan, as_spec

_MAX_KERNEL_NDIM = 5  # Dense (2) and 1D/2D/3D convs.


@dataclasses.dataclass
class _Kernel:
  """A kernel leaf and what we know about it."""

  keys: tuple[str, ...]  # Path of the kernel's parent dict.
  path: str  # "a/b/kernel"
  kernel: Any
  bias: Any
  stack: int
  plan: LayerPlan | None = None
  factors: tuple | None = None  # (u, s, v) in compute dtype, stack flattened.
  params: dict | None = None  # The factor params that replace kernel and bias.
  gram: tuple | None = None  # (gram, count) from ``calibration``, when given for it.
  whitened: Any = None  # Data-aware: per stack slice, whether whitening succeeded.
  damping: float = 0.0  # Data-aware: the spec's damping.

  @property
  def in_shape(self):
    return self.kernel.shape[self.stack : -1]

  @property
  def stack_shape(self):
    return self.kernel.shape[: self.stack]

  @property
  def m(self):
    return int(np.prod(self.in_shape))

  @property
  def n(self):
    return int(self.kernel.shape[-1])

  def matrices(self):
    """``(prod(stack), m, n)``: every slice of the stack as a matrix (NumPy on the host:
    an eager jnp reshape would compile a program per shape)."""
    kernel = np.asarray(self.kernel) if _on_host(self.kernel) else self.kernel
    return kernel.reshape(-1, self.m, self.n)


def _is_array(x, abstract: bool = False) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) or (abstract and isinstance(x, jax.ShapeDtypeStruct))


def _all_finite(x) -> bool:
  if isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct)):
    return True  # Unknowable under jit; checked on concrete calls.
  if isinstance(x, np.ndarray) or (len(x.devices()) == 1 and _on_host(x)):
    return bool(np.isfinite(np.asarray(x)).all())  # No compile, no copy on CPU.
  return bool(_finite(x))  # A sharded reduction: nothing is gathered.


@jax.jit
def _finite(x):
  return jnp.isfinite(x).all()


def _collect(params, spec: InherSpec, abstract: bool = False) -> list[_Kernel]:
  """Finds kernels, validates every leaf, infers stack axes.

  ``abstract`` also accepts `jax.ShapeDtypeStruct` leaves (`sharded_stages`).
  """
  if not isinstance(params, Mapping):
    raise TypeError(
        f"params must be a (nested) dict of arrays, the 'params' collection of a Flax "
        f"model, got {type(params).__name__}"
    )
  if "params" in params and any(k in params for k in ("batch_stats", "cache", "intermediates")):
    raise TypeError(
        "params looks like a full variables dict (it has 'params' and "
        f"{sorted(k for k in params if k != 'params')}); pass variables['params']"
    )
  kernels = []

  def visit(node, keys):
    for k, v in node.items():
      path = "/".join((*keys, str(k)))
      if isinstance(v, Mapping):
        visit(v, (*keys, str(k)))
        continue
      if not _is_array(v, abstract):
        raise TypeError(
            f"{path}: expected an array leaf, got {type(v).__name__}; params must be a "
            "pytree of arrays"
        )
      if k != "kernel":
        continue
      stack = spec.stack_axes(path)
      bias = node.get("bias")
      if stack is None:
        # A scan-stacked layer has a bias with the same leading layer axes.
        stack = 0
        if _is_array(bias, abstract) and bias.ndim >= 2:
          lead = bias.ndim - 1
          if bias.shape[:lead] == v.shape[:lead] and bias.shape[-1] == v.shape[-1]:
            stack = lead
      if spec.match(path)[1].get("skip"):
        kernels.append(_Kernel(keys, path, v, bias, stack, LayerPlan(False, 0, 0, 0, "skipped by rule")))
        continue
      ndim = v.ndim - stack
      if not 2 <= ndim <= _MAX_KERNEL_NDIM:
        raise ValueError(
            f"{path}: kernel of shape {tuple(v.shape)} ({stack} stack axes) has "
            f"{ndim} dims; InherDense/InherConv support 2 (Dense) to "
            f"{_MAX_KERNEL_NDIM} (3-D conv). Skip it with a rule ({re.escape(path)!r}, 'skip')"
        )
      if not jnp.issubdtype(v.dtype, jnp.floating):
        raise TypeError(f"{path}: kernel dtype must be floating, got {v.dtype}")
      if not _all_finite(v):
        raise ValueError(f"{path}: kernel has NaN or Inf values; cannot inherit from it")
      kernels.append(_Kernel(keys, path, v, bias, stack))

  visit(params, ())
  for i, (pattern, _) in enumerate(spec.rules):
    if not any(re.fullmatch(pattern, k.path) for k in kernels):
      warnings.warn(f"InherSpec.rules[{i}] ({pattern!r}) matches no kernel", stacklevel=3)
  return kernels


def _by_shape(kernels):
  groups: dict[Any, list[_Kernel]] = {}
  for k in kernels:
    groups.setdefault((k.m, k.n), []).append(k)
  return groups


def _plan_all(kernels: list[_Kernel], spec: InherSpec, mesh: Mesh | None = None) -> None:
  data = [k for k in kernels if k.plan is None and spec.needs_data(k.path)]
  if any(isinstance(k.kernel, (jax.core.Tracer, jax.ShapeDtypeStruct)) for k in data):
    raise ValueError(
        "the energy policy needs concrete teacher weights; call "
        "spec = inhernet_jax.resolve(params, spec) outside jit and pass the resolved spec"
    )
  values = {}
  if mesh is not None:  # Sharded: kernel by kernel, only the singular values come back.
    for k in data:
      values[k.path] = _sharded._sharded_singular_values(k, mesh)
    data = []
  for group in _by_shape(data).values():
    mats = [k.matrices() for k in group]
    xp = np if all(isinstance(m, np.ndarray) for m in mats) else jnp
    sv = np.asarray(svd.singular_values(xp.concatenate(mats), xp=xp))
    offset = 0
    for k in group:
      count = int(np.prod(k.stack_shape))
      values[k.path] = sv[offset : offset + count]
      offset += count
  for k in kernels:
    if k.plan is not None:
      continue
    use_bias = k.bias is not None
    sv = values.get(k.path)
    if sv is None:
      k.plan = spec.plan(k.path, k.m, k.n, use_bias)
      continue
    # One rank for the whole stack (scan layers share shapes): the largest any slice needs.
    plans = [spec.plan(k.path, k.m, k.n, use_bias, s) for s in sv]
    k.plan = max(plans, key=lambda p: (p.factorize, p.rank))


def _decompose(kernels: list[_Kernel], spec: InherSpec, key) -> None:
  """Truncated SVDs of every factorised kernel, batched, and their factor params.

  Kernels of one matrix shape and rank form a group (one batched call). For the
  randomized method the costly subspace iteration is batched further over all groups
  whose Gram matrices have the same size, whatever their other side.

  The glue around it (stacking, Gram products, recovery, reshapes, casts) is written
  once over an array namespace: NumPy when every kernel is a concrete array in host
  memory, because on CPU compiling one XLA program per distinct shape costs more than
  the work itself; jitted ``jax.numpy`` otherwise (accelerators, or inside a jit).

  Kernels are taken in sorted path order (`_in_order`), so which random start matrix
  a kernel gets does not depend on the key order of the params dicts.

  Data-aware kernels (their `_attach_grams` Grams attached) form groups of their own,
  decomposed by `svd.whitened_svd`.
  """
  groups: dict[Any, list[_Kernel]] = {}
  for k in _in_order(kernels):
    if k.plan.factorize:
      groups.setdefault((k.m, k.n, k.plan.rank, k.plan.data_aware), []).append(k)
  todo = [k for g in groups.values() for k in g]
  host = bool(todo) and all(_on_host(k.kernel) for k in todo)
  stack, exact, whiten, finish = (
      (_stack, _exact, _whitened, _finish_group) if host
      else (_stack_jit, _exact_jit, _whitened_jit, _finish_group_jit)
  )
  xp = np if host else jnp

  def arrays(group):
    return tuple(np.asarray(k.kernel) if host else k.kernel for k in group)

  buckets: dict[Any, list] = {}
  for (m, n, rank, aware), group in groups.items():
    if aware:
      grams = tuple(np.asarray(k.gram[0]) if host else k.gram[0] for k in group)
      counts = tuple(np.asarray(k.gram[1], np.float64) if host else jnp.asarray(k.gram[1]) for k in group)
      down, s, v, ok = whiten(arrays(group), grams, counts, m, n, rank, spec.damping, xp=xp)
      _note_whitening(group, ok, spec.damping)
      _store(group, key, finish(down, s, v, _biases(group, host), _meta(group), None, 0, xp=xp))
    elif svd.resolve_method(m, n, rank, spec.method) == "exact":
      u, s, v = exact(arrays(group), m, n, rank, xp=xp)
      _store(group, key, finish(u, s, v, _biases(group, host), _meta(group), None, 0, xp=xp))
    else:
      a, g = stack(arrays(group), m, n, xp=xp)
      size = min(m, n)
      bucket = (size, rank, min(size, rank + svd._oversample(rank, None)))
      buckets.setdefault(bucket, []).append((group, a, g))
  svd_key = jax.random.key(0) if key is None else key
  for (size, rank, k), items in buckets.items():
    g = xp.concatenate([g for _, _, g in items]) if len(items) > 1 else items[0][2]
    q = svd.subspace(g, rank, jax.random.fold_in(svd_key, size * 100003 + rank), k=k, xp=xp)
    offset = 0
    for group, a, _ in items:
      meta = _meta(group)
      _store(group, key, finish(a, None, q, _biases(group, host), meta, "finalize", offset, xp=xp))
      offset += a.shape[0]


def _in_order(kernels: list[_Kernel]) -> list[_Kernel]:
  """Kernels sorted by path: the order `jax.tree` functions (and `sharding.put`) give
  dict keys, whatever the order a params dict was built in."""
  return sorted(kernels, key=lambda k: k.keys)


def _on_host(x) -> bool:
  if isinstance(x, np.ndarray):
    return True
  return not isinstance(x, jax.core.Tracer) and all(d.platform == "cpu" for d in x.devices())


def _meta(group):
  return tuple(
      (k.stack_shape, k.in_shape, k.n, k.plan.rank, k.plan.heads, k.kernel.dtype.name)
      for k in group
  )


def _biases(group, host):
  return tuple(None if k.bias is None else np.asarray(k.bias) if host else k.bias for k in group)


def _stack(kernels, m, n, *, xp):
  a = xp.concatenate([k.reshape(-1, m, n) for k in kernels]).astype(svd.compute_dtype())
  return a, svd.gram(a, xp=xp)


def _exact(kernels, m, n, rank, *, xp):
  a = xp.concatenate([k.reshape(-1, m, n) for k in kernels])
  return svd.exact_svd(a, rank, xp=xp)


def _whitened(kernels, grams, counts, m, n, rank, damping, *, xp):
  a = xp.concatenate([k.reshape(-1, m, n) for k in kernels])
  # Per-row means: the factors' scales do not depend on the number of calibration rows.
  g = xp.concatenate([(g / c[..., None, None]).reshape(-1, m, m) for g, c in zip(grams, counts)])
  return svd.whitened_svd(a, g, rank, damping, xp=xp)


def _note_whitening(group, ok, damping) -> None:
  """Keeps which slices were whitened; warns for each kernel whose Cholesky failed."""
  if isinstance(ok, jax.core.Tracer):  # Under jit: warn when it runs.
    jax.debug.callback(functools.partial(_note_whitening, group, damping=damping), ok)
    return
  ok, offset = np.asarray(ok), 0
  for k in group:
    count = int(np.prod(k.stack_shape))
    k.whitened, k.damping = ok[offset : offset + count], damping
    offset += count
    if not k.whitened.all():
      where = f" (stack slices {np.flatnonzero(~k.whitened).tolist()})" if k.stack else ""
      warnings.warn(
          f"{k.path}: Cholesky of the damped input Gram failed{where} (not positive definite "
          f"or not finite); plain SVD used instead. Raise InherSpec.damping (now {damping}) "
          "or calibrate on more (or non-degenerate) inputs", stacklevel=5)


def _attach_grams(kernels: list[_Kernel], calibration) -> None:
  """Attaches each factorised kernel's ``(gram, count)`` from ``calibration``; a
  data-aware kernel must have one of shape ``(*stack, m, m)``."""
  if calibration is None:
    calibration = {}
  if not isinstance(calibration, Mapping):
    raise TypeError(
        "calibration must map kernel paths to {'gram', 'count'} dicts (from "
        f"inhernet_jax.calibration.input_grams), got {type(calibration).__name__}")
  for k in kernels:
    if k.plan.factorize:
      k.gram = _gram_of(k, calibration, required=k.plan.data_aware)


def _gram_of(k: _Kernel, calibration: Mapping, required: bool):
  """``(gram, count)`` for kernel ``k``, validated, or None when not given (and optional)."""
  expected = (*k.stack_shape, k.m, k.m)
  how = ("compute them on a few batches with calibration = inhernet_jax.calibration."
         "input_grams(teacher_model, variables, batches)")
  entry = calibration.get(k.path)
  if entry is None:
    if required:
      raise ValueError(
          f"{k.path}: data-aware inheritance needs this kernel's input Gram X^T X, shape "
          f"{expected}, as calibration[{k.path!r}] = {{'gram': ..., 'count': rows}}; {how}")
    return None
  gram, count = entry, 1
  if isinstance(entry, Mapping):
    gram, count = entry.get("gram"), entry.get("count", 1)
  if not _is_array(gram) or tuple(gram.shape) != expected:
    got = f"of shape {tuple(gram.shape)}" if _is_array(gram) else f"a {type(gram).__name__}"
    raise ValueError(
        f"{k.path}: calibration Gram is {got}, expected shape {expected} "
        f"({k.stack} stack axes, m = {k.m} inputs of the kernel of shape "
        f"{tuple(k.kernel.shape)}); {how}")
  if not isinstance(count, jax.core.Tracer) and not np.all(np.asarray(count) > 0):
    raise ValueError(f"{k.path}: calibration count must be > 0, got {count!r}")
  return gram, count


def _finish_group(a, s, x, biases, meta, mode, offset, *, xp):
  """Per-kernel ``(u, s, v)`` and down/up params of one group."""
  if mode == "finalize":
    count = sum(int(np.prod(stack)) for stack, *_ in meta)
    u, s, v = svd.finalize(a, x[offset : offset + count], meta[0][3], xp=xp)
  else:
    u, s, v = a, s, x
  u, v = _canonical_signs(u, v, xp=xp)
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


def _canonical_signs(u, v, *, xp):
  """Flips each singular pair so that the largest-magnitude entry of its ``u`` column
  is positive (ties: positive). LAPACK builds differ in the signs they return (NumPy's
  and XLA's float32 SVDs do), so without this the host, jitted and sharded paths would
  agree only up to the sign of each (down column, up row) pair."""
  flip = -xp.min(u, axis=-2, keepdims=True) > xp.max(u, axis=-2, keepdims=True)
  sign = xp.where(flip, -1, 1).astype(u.dtype)
  return u * sign, v * sign


_stack_jit = jax.jit(_stack, static_argnums=(1, 2), static_argnames=("xp",))
_exact_jit = jax.jit(_exact, static_argnums=(1, 2, 3), static_argnames=("xp",))
_finish_group_jit = jax.jit(_finish_group, static_argnums=(4, 5, 6), static_argnames=("xp",))
_whitened_jit = jax.jit(_whitened, static_argnums=(3, 4, 5, 6), static_argnames=("xp",))


def _store(group, key, results) -> None:
  """Keeps each kernel's factors and its params (as jax arrays), adding the gate."""
  for k, (factors, params) in zip(group, results):
    k.factors = factors
    # device_put, not jnp.asarray: the latter compiles a program per shape.
    k.params = jax.tree.map(jax.device_put, params)
    if k.plan.heads > 1:
      k.params["gate"] = _gate_params(key, k)


def _gate_params(key, k: _Kernel) -> dict:
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
  return jax.tree.map(jax.device_put, _host_gate(key, k))


def _host_gate(key, k: _Kernel) -> dict:
  """`_gate_params` drawn with NumPy (a concrete key): ``{"kernel", "bias"}`` arrays."""
  seed = zlib.crc32(k.path.encode())
  rank, heads, dtype = k.plan.rank, k.plan.heads, jnp.dtype(k.kernel.dtype)
  words = [0] if key is None else [int(w) for w in np.ravel(_key_data(key))]
  bound = 1.0 / np.sqrt(rank)
  # Drawn in float64 and cast, so a bf16 teacher gets the same gates, rounded.
  gate = np.random.default_rng([*words, seed]).uniform(-bound, bound, (*k.stack_shape, rank, heads))
  return {"kernel": gate.astype(dtype), "bias": np.zeros((*k.stack_shape, heads), dtype)}


def _key_data(key):
  return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _draw_gates(key, seed, stack_shape, rank, heads, dtype):
  keys = jax.random.split(jax.random.fold_in(key, seed), int(np.prod(stack_shape)))
  gates = jax.vmap(lambda k: gate_kernel_init(k, (rank, heads), jnp.float32))(keys)
  return gates.reshape(*stack_shape, rank, heads).astype(dtype)


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


def _report_row(k: _Kernel) -> dict:
  use_bias = k.bias is not None
  layers = int(np.prod(k.stack_shape))
  before = layers * svd.dense_params(k.m, k.n, use_bias)
  row = {
      "path": k.path,
      "shape": tuple(int(d) for d in k.kernel.shape),
      "stack": k.stack,
      "action": "factorize" if k.plan.factorize else "keep",
      "reason": k.plan.reason,
      "rank": k.plan.rank,
      "heads": k.plan.heads if k.plan.factorize else 0,
      "full_rank": min(k.m, k.n),
      "energy": 1.0,
      "error": 0.0,
      "rel_error": 0.0,
      "params_before": before,
      "params_after": before,
      "data_aware": False,
      "output_rel_error": 0.0,
  }
  if k.plan.factorize:
    # On the host in float64: reports are for reading, and the error of the factors we
    # actually produced (not a formula) is what a user wants to see.
    a = np.asarray(k.matrices(), np.float64)
    u, s, v = (np.asarray(f, np.float64) for f in k.factors)
    diff = a - (u * s[:, None, :]) @ np.swapaxes(v, -1, -2)
    norms = np.square(a).sum((-2, -1))
    total = float(norms.sum())
    row["energy"] = float(np.square(s).sum()) / total if total > 0 else 1.0
    row["error"] = float(np.linalg.norm(diff))
    row["rel_error"] = row["error"] / np.sqrt(total) if total > 0 else 0.0
    row["params_after"] = layers * svd.inherited_params(
        k.m, k.n, k.plan.rank, k.plan.heads, use_bias
    )
    row["output_rel_error"] = None
    if k.gram is not None:  # ||X (A - A_r)|| / ||X A|| on the calibration inputs.
      count = np.asarray(k.gram[1], np.float64)[..., None, None]  # Per row, as `_whitened`.
      g = (np.asarray(k.gram[0], np.float64) / count).reshape(-1, k.m, k.m)
      out = _trace_form(a, g).sum()
      row["output_rel_error"] = float(np.sqrt(_trace_form(diff, g).sum() / out)) if out > 0 else 0.0
    if k.whitened is not None:
      # s are singular values of L^T A (or of A where whitening failed): the energy kept
      # is the share of the damped Gram's output energy ||L^T A||^2.
      g = g + k.damping * np.mean(np.diagonal(g, axis1=-2, axis2=-1), -1)[:, None, None] * np.eye(k.m)
      energy = float(np.where(k.whitened, _trace_form(a, g), norms).sum())
      row["energy"] = float(np.square(s).sum()) / energy if energy > 0 else 1.0
      row["data_aware"] = bool(k.whitened.all())
      if not row["data_aware"]:
        failed = np.flatnonzero(~k.whitened).tolist()
        row["reason"] = f"data-aware: Gram not positive definite, plain SVD for slices {failed}"
  return row


def _trace_form(x, g):
  """``tr(x^T g x)`` per slice: ``||X x||_F^2`` for inputs with Gram ``g = X^T X``."""
  return np.einsum("bij,bij->b", x, g @ x)


def _run(params, rank, heads, rules, key, need_factors=True, *, mesh=None,
         sharding_rules=None, keep_factors=True, trace=None, calibration=None):
  spec = as_spec(rank, heads, rules)
  kernels = _collect(params, spec, abstract=not need_factors)  # Plans need shapes only.
  mesh = _sharded._sharded_mesh(kernels, mesh)
  if mesh is not None:
    sharding_rules = sharding_lib.resolve_rules(sharding_rules)
    _sharded._place_all(kernels, mesh, sharding_rules)
  _plan_all(kernels, spec, mesh)
  if need_factors:
    _attach_grams(kernels, calibration)
  if need_factors and mesh is None:
    _decompose(kernels, spec, key)
  elif need_factors:
    _sharded._decompose_sharded(kernels, spec, key, mesh, sharding_rules, keep_factors, trace)
  return spec, kernels


def inherit(
    params,
    rank: int | float | InherSpec,
    *,
    heads: int | None = None,
    rules=(),
    key: jax.Array | None = None,
    return_report: bool = False,
    mesh: Mesh | None = None,
    sharding_rules=None,
    trace: Callable[[_sharded.Stage], None] | None = None,
    calibration: Mapping[str, Any] | None = None,
):
  """Inherits a teacher: every selected kernel becomes a gated low-rank factorisation.

  Args:
    params: the teacher's ``params`` collection (nested dict of arrays). Not mutated.
    rank: an int rank, a float fraction of each layer's full rank in (0, 1], or an
      `InherSpec` (energy / parameter-ratio policies, rules, heads).
    heads: number of expert up-projections (overrides the spec's).
    rules: extra ``(regex, action)`` rules, tried before the spec's own.
    key: PRNG key for the new gate weights and the randomized SVD; a fixed default,
      so the same call always returns the same pytree.
    return_report: also return `inherit_report`'s rows (sharded: each kernel and its
      factors are brought to the host, one at a time, for the float64 error).
    mesh: decompose on this mesh (the sharded path, see the module docstring; a
      one-device mesh for a big single-device teacher); by default the mesh the
      kernels are sharded over, if any kernel spans several devices. Kernels not on it
      are placed by ``sharding_rules``.
    sharding_rules: `sharding` rules (or a `sharding.RULE_SETS` name; default
      `sharding.DEFAULT_RULES`) for the new params of the sharded path.
    trace: sharded path only: called with each `Stage`, its concrete ``args`` filled
      in, right after it ran (memory measurements).
    calibration: ``{kernel path: {"gram": (*stack, m, m), "count": rows}}`` input Grams
      (`inhernet_jax.calibration.input_grams`), required for every data-aware kernel
      (the spec's ``data_aware``); others only use them for the report's
      ``output_rel_error``. A data-aware kernel whose damped Gram is not positive
      definite falls back to the plain SVD, with a warning naming it.

  Returns:
    The inherited params (and the report rows when ``return_report``). Right after this
    call the inherited network computes the rank-r truncation of the teacher exactly
    (the data-aware one ``A_r = L^{-T} U_r S_r V_r^T`` for data-aware kernels).

  Raises:
    TypeError / ValueError naming the offending argument or leaf path.
  """
  spec, kernels = _run(params, rank, heads, rules, key, mesh=mesh, sharding_rules=sharding_rules,
                       keep_factors=return_report, trace=trace, calibration=calibration)
  factorised = {k.keys: k for k in kernels if k.plan.factorize}
  out = _rebuild(params, (), factorised)
  if return_report:
    return out, [_report_row(k) for k in kernels]
  return out


def inherit_report(params, rank: int | float | InherSpec, *, heads=None, rules=(),
                   mesh: Mesh | None = None, calibration=None) -> list[dict]:
  """One row per kernel: path, shape, action, rank, heads, energy kept, Eckart-Young
  error (absolute and relative), parameters before and after. Kept kernels appear too.
  Sharded teachers (or ``mesh``) are decomposed by the sharded path.

  With ``calibration`` Grams (see `inherit`): ``output_rel_error``, the relative output
  error ``||X (A - A_r)|| / ||X A||`` on the calibration inputs (None for factorised
  kernels without a Gram). ``data_aware`` is True for kernels truncated for it, whose
  ``energy`` is the share of the damped output energy ``||L^T A||^2`` kept; ``error``
  and ``rel_error`` stay the weight error of the factors produced."""
  _, kernels = _run(params, rank, heads, rules, None, mesh=mesh, calibration=calibration)
  return [_report_row(k) for k in kernels]


def resolve(params, rank: int | float | InherSpec, *, heads=None, rules=()) -> InherSpec:
  """Freezes a spec's decisions for ``params`` into exact per-path rules.

  Needed for data-dependent policies (energy): the layers see shapes, not singular values,
  so a model is built with the resolved spec: ``Model(spec=resolve(teacher, spec))``.
  Data-aware kernels keep ``data_aware`` (`inherit` with the resolved spec still needs
  their Grams); the rank policy uses the weights' spectra either way.
  """
  spec, kernels = _run(params, rank, heads, rules, None, need_factors=False)
  exact = []
  for k in kernels:
    action = {"stack": k.stack}
    if k.plan.factorize:
      action.update(rank=k.plan.rank, heads=k.plan.heads)
      if k.plan.data_aware:
        action["data_aware"] = True
    else:
      action["skip"] = True
    exact.append((re.escape(k.path), action))
  return spec.replace(rules=tuple(exact) + spec.rules, energy=None)


def planned_param_count(params, rank: int | float | InherSpec, *, heads=None, rules=()) -> int:
  """Parameters of ``inherit(params, rank, ...)`` without computing any factorisation
  (singular values only for the energy policy); ``params`` may be abstract
  (`jax.ShapeDtypeStruct` leaves) unless the policy needs values."""
  _, kernels = _run(params, rank, heads, rules, None, need_factors=False)
  total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  for k in kernels:
    if k.plan.factorize:
      use_bias = k.bias is not None
      layers = int(np.prod(k.stack_shape))
      total -= layers * svd.dense_params(k.m, k.n, use_bias)
      total += layers * svd.inherited_params(k.m, k.n, k.plan.rank, k.plan.heads, use_bias)
  return total


def format_report(rows: list[dict]) -> str:
  """A plain-text table of `inherit_report` rows with a totals line."""
  head = f"{'path':<48} {'shape':<20} {'action':<9} {'rank':>5} {'H':>2} {'energy':>7} {'rel.err':>8} {'params':>12}"
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(
        f"{r['path'][-48:]:<48} {str(r['shape']):<20} {r['action']:<9} {r['rank']:>5} "
        f"{r['heads']:>2} {r['energy']:>7.4f} {r['rel_error']:>8.4f} "
        f"{r['params_before']:>6}->{r['params_after']:<6}"
        + (f"  ({r['reason']})" if r["reason"] else "")
        + ("  (data-aware)" if r.get("data_aware") else "")
    )
  before = sum(r["params_before"] for r in rows)
  after = sum(r["params_after"] for r in rows)
  lines.append(f"kernels: {len(rows)}, params {before} -> {after} ({after / max(before, 1):.3f}x)")
  return "\n".join(lines)


# The sharded path lives in its own module; imported last (it uses the helpers above).
from inhernet_jax import inherit_sharded as _sharded  # noqa: E402
from inhernet_jax.inherit_sharded import (  # noqa: E402,F401  (re-exported)
    Stage,
    device_bytes,
    plan_memory,
    sharded_stages,
    stage_temp_bytes,
)
