"""The decomposition plan: which kernels are inherited, how, and in which batches.

Computed once from a teacher's params and an `InherSpec`, before any decomposition:
every kernel leaf (`Kernel`: its path, matrix view ``m x n``, stack axes, bias), its
`LayerPlan` (rank, heads, or why it is kept), and the batches the executors run
(`groups`: kernels of one matrix shape, rank and method, each with its own random
start matrices, seeded by ``(key, crc32(path), stack slice)`` (`start_seeds`), so a
kernel's factors do not depend on what it is batched with). The local executors
(`host.run`: NumPy, one task per matrix; jitted ``jax.numpy``) and the sharded one
(`inherit_sharded`) run the same plan and turn the same ``(u, s, v)`` into params
(`finish_group`) and gates (`gate_params`), so every path gives the same factors.

Example::

  kernels = collect(params, spec)
  plan_all(kernels, spec)                  # LayerPlans (singular values for energy)
  for group in groups(kernels, spec):      # what one batched decomposition does
    print(group.method, [k.path for k in group.kernels])
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

from inhernet_jax.common import rules as rules_lib
from inhernet_jax.decomposition import svd
from inhernet_jax.decomposition.spec import InherSpec, LayerPlan

MAX_KERNEL_NDIM = 5  # Dense (2) and 1D/2D/3D convs.

# Why random and not zero: right after inheritance all heads are identical. If the gate
# were uniform for every input, each head's gradient would be the same (g_h = 1/H times
# the same term) and the gate's gradient would be zero (the heads' outputs agree), so the
# heads would stay identical forever and H heads would be one head. A random gate weighs
# the heads differently per sample, so their gradients differ from the first step. The
# scale is PyTorch's default Linear init, which the public demo uses.
gate_kernel_init = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


@dataclasses.dataclass
class Kernel:
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

  @property
  def layers(self) -> int:
    """Stacked layers (1 when unstacked)."""
    return int(np.prod(self.stack_shape))

  def param_counts(self) -> tuple[int, int]:
    """``(teacher, planned)``: parameters of this kernel and its bias over its stacked
    layers, as the teacher has them and as ``plan`` makes them (equal when kept). The
    one place an inherited layer is counted; abstract kernels (`jax.ShapeDtypeStruct`) do."""
    use_bias = self.bias is not None
    dense = self.layers * svd.dense_params(self.m, self.n, use_bias)
    if self.plan is None or not self.plan.factorize:
      return dense, dense
    return dense, self.layers * svd.inherited_params(self.m, self.n, self.plan.rank,
                                                     self.plan.heads, use_bias)

  def matrices(self):
    """``(prod(stack), m, n)``: every slice of the stack as a matrix (NumPy on the host:
    an eager jnp reshape would compile a program per shape)."""
    kernel = np.asarray(self.kernel) if on_host(self.kernel) else self.kernel
    return kernel.reshape(-1, self.m, self.n)


def is_array(x, abstract: bool = False) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) or (abstract and isinstance(x, jax.ShapeDtypeStruct))


def all_finite(x) -> bool:
  if isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct)):
    return True  # Unknowable under jit; checked on concrete calls.
  if isinstance(x, np.ndarray) or (len(x.devices()) == 1 and on_host(x)):
    a = np.asarray(x)  # No compile, no copy on CPU.
    if a.dtype == jnp.bfloat16:  # Exponent bits: 4x faster than isfinite on bf16.
      return bool(a.size == 0 or np.max(a.view(np.uint16) & 0x7FFF) < 0x7F80)
    return bool(np.isfinite(a).all())
  return bool(_finite(x))  # A sharded reduction: nothing is gathered.


@jax.jit
def _finite(x):
  return jnp.isfinite(x).all()


def collect(params, spec: InherSpec, abstract: bool = False) -> list[Kernel]:
  """Finds kernels, validates every leaf, infers stack axes.

  ``abstract`` also accepts `jax.ShapeDtypeStruct` leaves (`sharded_stages`).
  """
  if not isinstance(params, Mapping):
    raise TypeError(
        f"params must be a (nested) dict of arrays, the 'params' collection of a Flax "
        f"model, got {type(params).__name__}")
  if "params" in params and any(k in params for k in ("batch_stats", "cache", "intermediates")):
    raise TypeError(
        "params looks like a full variables dict (it has 'params' and "
        f"{sorted(k for k in params if k != 'params')}); pass variables['params']")
  kernels = []

  def visit(node, keys):
    for k, v in node.items():
      path = "/".join((*keys, str(k)))
      if isinstance(v, Mapping):
        visit(v, (*keys, str(k)))
        continue
      if not is_array(v, abstract):
        raise TypeError(
            f"{path}: expected an array leaf, got {type(v).__name__}; params must be a "
            "pytree of arrays")
      if k != "kernel":
        continue
      stack = spec.stack_axes(path)
      bias = node.get("bias")
      if stack is None:
        # A scan-stacked layer has a bias with the same leading layer axes.
        stack = 0
        if is_array(bias, abstract) and bias.ndim >= 2:
          lead = bias.ndim - 1
          if bias.shape[:lead] == v.shape[:lead] and bias.shape[-1] == v.shape[-1]:
            stack = lead
      if spec.match(path)[1].get("skip"):
        kernels.append(Kernel(keys, path, v, bias, stack, LayerPlan(False, 0, 0, 0, "skipped by rule")))
        continue
      if is_array(bias, abstract) and tuple(bias.shape) != (*v.shape[:stack], v.shape[-1]):
        raise ValueError(
            f"{path}: kernel of shape {tuple(v.shape)} ({stack} stack axes) has a bias of shape "
            f"{tuple(bias.shape)}, expected {(*v.shape[:stack], v.shape[-1])}: InherDense / "
            "InherConv read every axis but the last as inputs (a DenseGeneral with several "
            "output axes does not fit). Skip it with a rule "
            f"({re.escape(path)!r}, 'skip'), or declare scan-stacked layer axes with {{'stack': N}}")
      ndim = v.ndim - stack
      if not 2 <= ndim <= MAX_KERNEL_NDIM:
        raise ValueError(
            f"{path}: kernel of shape {tuple(v.shape)} ({stack} stack axes) has "
            f"{ndim} dims; InherDense/InherConv support 2 (Dense) to "
            f"{MAX_KERNEL_NDIM} (3-D conv). Skip it with a rule ({re.escape(path)!r}, 'skip')")
      if not jnp.issubdtype(v.dtype, jnp.floating):
        raise TypeError(f"{path}: kernel dtype must be floating, got {v.dtype}")
      if not all_finite(v):
        raise ValueError(f"{path}: kernel has NaN or Inf values; cannot inherit from it")
      kernels.append(Kernel(keys, path, v, bias, stack))

  visit(params, ())
  rules_lib.warn_unmatched(spec.rules, [k.path for k in kernels], "InherSpec.rules", "kernel",
                           stacklevel=3)
  return kernels


def by_shape(kernels):
  groups: dict[Any, list[Kernel]] = {}
  for k in kernels:
    groups.setdefault((k.m, k.n), []).append(k)
  return groups


def plan_all(kernels: list[Kernel], spec: InherSpec,
             singular_values: Callable[[Kernel], np.ndarray] | None = None) -> None:
  """Sets every kernel's `LayerPlan` (once; kernels already planned keep theirs).

  The energy policy needs each kernel's singular values: computed here, batched by
  shape (NumPy on the host, else jitted), or by ``singular_values(kernel)`` (the
  sharded path's). Every slice of a stacked kernel must meet the energy target: the
  stack gets the largest rank any slice needs, and is kept whole (with the slice's
  reason) when one slice must stay dense.
  """
  data = [k for k in kernels if k.plan is None and spec.needs_data(k.path)]
  if any(isinstance(k.kernel, (jax.core.Tracer, jax.ShapeDtypeStruct)) for k in data):
    raise ValueError(
        "the energy policy needs concrete teacher weights; call "
        "spec = inhernet_jax.resolve(params, spec) outside jit and pass the resolved spec")
  values = {}
  if singular_values is not None:
    values = {k.path: singular_values(k) for k in data}
    data = []
  for group in by_shape(data).values():
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
    plans = [spec.plan(k.path, k.m, k.n, use_bias, s) for s in sv]
    kept = [i for i, p in enumerate(plans) if not p.factorize]
    if kept and len(plans) > 1:
      first = plans[kept[0]]
      k.plan = dataclasses.replace(first, reason=f"stack slice {kept[0]} must stay dense: {first.reason}")
    elif kept:
      k.plan = plans[0]
    else:  # Every slice factorises: the largest rank (its plan passed the saving checks).
      k.plan = max(plans, key=lambda p: p.rank)


@dataclasses.dataclass(frozen=True)
class Group:
  """One batched decomposition: kernels whose slices are ``m x n`` matrices truncated
  to one rank by one method, in path order.

  Attributes:
    m, n: the matrix view of every slice.
    rank: the truncation rank.
    method: ``"exact"``, ``"randomized"`` or ``"whitened"`` (data-aware).
    width: columns of the randomized method's subspace (0 otherwise).
    power_iters: power iterations of the randomized method.
    kernels: the kernels, their slices stacked in this order.
  """

  m: int
  n: int
  rank: int
  method: str
  width: int
  power_iters: int
  kernels: tuple

  @property
  def slices(self) -> int:
    return sum(int(np.prod(k.stack_shape)) for k in self.kernels)

  @property
  def paths(self) -> str:
    return ", ".join(k.path for k in self.kernels)


def groups(kernels: list[Kernel], spec: InherSpec) -> list[Group]:
  """The batches of every factorised kernel (see `Group`), in path order."""
  out: dict[Any, list[Kernel]] = {}
  for k in in_order(kernels):
    if k.plan.factorize:
      method = "whitened" if k.plan.data_aware else svd.resolve_method(
          k.m, k.n, k.plan.rank, spec.method, spec.oversample,
          energy_target=spec.needs_data(k.path))  # Issue 26: energy targets kept.
      out.setdefault((k.m, k.n, k.plan.rank, method), []).append(k)
  return [
      Group(m, n, rank, method,
            svd.width(m, n, rank, spec.oversample) if method == "randomized" else 0,
            spec.power_iters, tuple(ks))
      for (m, n, rank, method), ks in out.items()
  ]


def kernel_key(key, k: Kernel) -> jax.Array:
  """The kernel's own key: ``fold_in(key, crc32(path))`` (``key`` None: ``key(0)``);
  the start of a traced key (`svd.traced_start_bits`)."""
  base = jax.random.key(0) if key is None else key
  return jax.random.fold_in(base, path_seed(k))


def path_seed(k: Kernel) -> int:
  return zlib.crc32(k.path.encode()) & 0x7FFFFFFF


def start_seeds(key, k: Kernel) -> list[tuple[int, ...]]:
  """Kernel ``k``'s start seeds, one per stack slice: ``(*key words, crc32(path), i)``."""
  root = (*svd.start_seed(key), path_seed(k))
  return [(*root, i) for i in range(int(np.prod(k.stack_shape)))]


def start(key, k: Kernel, width: int):
  """Kernel ``k``'s packed randomized start matrices ``(slices, svd.packed_bytes)``
  (`svd.start_bits` of `start_seeds`; a traced key: `svd.traced_start_bits`)."""
  rows, count = min(k.m, k.n), int(np.prod(k.stack_shape))
  if isinstance(key, jax.core.Tracer):
    return svd.traced_start_bits(kernel_key(key, k), count, rows, width)
  return svd.start_bits(start_seeds(key, k), rows, width)


def starts(group: Group, key):
  """A randomized group's packed start matrices, its kernels' slices in order."""
  parts = [start(key, k, group.width) for k in group.kernels]
  return (np if all(isinstance(p, np.ndarray) for p in parts) else jnp).concatenate(parts)


def decompose_group(arrays, biases, grams, counts, bits, *, group_meta, method, m, n,
                    rank, power_iters, damping, xp, width=0):
  """The computation of one `Group` (every executor runs this): its kernels' slices as
  one batch of matrices, their truncated SVD by ``method`` (randomized: from the packed
  start ``bits`` of ``width`` columns, `starts`, or their unpacked `svd.signs`), and
  each kernel's ``((u, s, v), params)`` (`finish_group`); plus, data-aware, whether
  each slice's Cholesky succeeded (else None)."""
  a = xp.concatenate([x.reshape(-1, m, n) for x in arrays])
  start_matrices = bits
  if bits is not None and bits.dtype == np.uint8:
    start_matrices = svd.signs(bits, min(m, n), width, xp=xp)
  g = None
  if method == "whitened":
    # Per-row means: the factors' scales do not depend on the number of calibration rows.
    g = xp.concatenate([(g / c[..., None, None]).reshape(-1, m, m) for g, c in zip(grams, counts)])
  u, s, v, ok = truncate(a, g, start_matrices, method, rank, power_iters, damping, xp=xp)
  return finish_group(u, s, v, biases, group_meta, xp=xp), ok


def truncate(a, gram, start_matrices, method, rank, power_iters, damping, *, xp):
  """``(u, s, v, ok)`` of a batch of matrices by ``method`` (``ok``: data-aware only)."""
  if method == "whitened":
    return svd.whitened_svd(a, gram, rank, damping, xp=xp)
  if method == "exact":
    return (*svd.exact_svd(a, rank, xp=xp), None)
  return (*svd.randomized_svd(a, rank, start_matrices, power_iters, xp=xp), None)


decompose_group_jit = jax.jit(
    decompose_group,
    static_argnames=("group_meta", "method", "m", "n", "rank", "power_iters", "damping", "xp",
                     "width"))


def in_order(kernels: list[Kernel]) -> list[Kernel]:
  """Kernels sorted by path: the order `jax.tree` functions (and `sharding.put`) give
  dict keys, whatever the order a params dict was built in."""
  return sorted(kernels, key=lambda k: k.keys)


def on_host(x) -> bool:
  if isinstance(x, np.ndarray):
    return True
  return not isinstance(x, jax.core.Tracer) and all(d.platform == "cpu" for d in x.devices())


def meta(group):
  return tuple((k.stack_shape, k.in_shape, k.n, k.plan.rank, k.plan.heads, k.kernel.dtype.name)
               for k in group)


def biases(group, host):
  return tuple(None if k.bias is None else np.asarray(k.bias) if host else k.bias for k in group)


def note_whitening(group, ok, damping) -> None:
  """Keeps which slices were whitened; warns for each kernel whose Cholesky failed."""
  if isinstance(ok, jax.core.Tracer):  # Under jit: warn when it runs.
    jax.debug.callback(functools.partial(note_whitening, group, damping=damping), ok)
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


def attach_grams(kernels: list[Kernel], calibration) -> None:
  """Attaches each factorised kernel's ``(gram, count)`` from ``calibration``; a
  data-aware kernel must have one of shape ``(*stack, m, m)``."""
  if calibration is None:
    calibration = {}
  if not isinstance(calibration, Mapping):
    raise TypeError(
        "calibration must map kernel paths to {'gram', 'count'} dicts (from "
        f"inhernet_jax.calibration.grams.input_grams), got {type(calibration).__name__}")
  for k in kernels:
    if k.plan.factorize:
      k.gram = gram_of(k, calibration, required=k.plan.data_aware)


def gram_of(k: Kernel, calibration: Mapping, required: bool):
  """``(gram, count)`` for kernel ``k``, validated, or None when not given (and optional)."""
  expected = (*k.stack_shape, k.m, k.m)
  how = ("compute them on a few batches with calibration = inhernet_jax.calibration.grams."
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
  if not is_array(gram) or tuple(gram.shape) != expected:
    got = f"of shape {tuple(gram.shape)}" if is_array(gram) else f"a {type(gram).__name__}"
    raise ValueError(
        f"{k.path}: calibration Gram is {got}, expected shape {expected} "
        f"({k.stack} stack axes, m = {k.m} inputs of the kernel of shape "
        f"{tuple(k.kernel.shape)}); {how}")
  if not isinstance(count, jax.core.Tracer) and not np.all(np.asarray(count) > 0):
    raise ValueError(f"{k.path}: calibration count must be > 0, got {count!r}")
  return gram, count


def finish_group(u, s, v, biases, meta, *, xp):
  """Per-kernel ``(u, s, v)`` and down/up params of one group's batched factors."""
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


def store(group, key, results) -> None:
  """Keeps each kernel's factors and its params (as jax arrays), adding the gate."""
  for k, (factors, params) in zip(group, results):
    k.factors = factors
    # device_put, not jnp.asarray: the latter compiles a program per shape.
    k.params = jax.tree.map(jax.device_put, params)
    if k.plan.heads > 1:
      k.params["gate"] = gate_params(key, k)


def gate_params(key, k: Kernel) -> dict:
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


def host_gate(key, k: Kernel) -> dict:
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

