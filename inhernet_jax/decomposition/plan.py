"""The one planning pass: every kernel's matrix view, rank, heads, method and start seeds.

`build` reads a teacher's params (`collect`: every kernel leaf as a `Kernel`, its
matrix view ``m x n`` and stack axes, validated), asks the rank policy
(`policy.stack_plan`) what happens to each, attaches the input Grams of data-aware
kernels, and batches the factorised kernels (`Group`: one matrix shape, rank and
method; `policy.method`), each kernel with its own start seeds (``(key, crc32(path),
stack slice)``, `start_seeds`: a kernel's factors do not depend on what it is batched
with). The result is one frozen `Plan`. The executors (`host.run`: NumPy;
`compute.run`: jitted; `sharded.decompose`: over a mesh) read it and return factors;
they decide nothing.

Example:
    ```python
    p = build(collect(params, spec), spec)
    for group in p.groups:                 # what one batched decomposition does
      print(group.method, group.rank, [k.path for k in group.kernels])
    ```
"""

from __future__ import annotations

import dataclasses
import re
import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from inhernet_jax.common import rules as rules_lib
from inhernet_jax.decomposition import policy
from inhernet_jax.decomposition import svd
from inhernet_jax.decomposition.policy import LayerPlan
from inhernet_jax.decomposition.spec import InherSpec

MAX_KERNEL_NDIM = 5  # Dense (2) and 1D/2D/3D convs.
MAX_SPATIAL = 11  # A bias-free 4-D kernel with both leading axes <= this: a 2-D conv.


class AmbiguousKernelWarning(UserWarning):
  """A bias-free kernel whose layout its params do not tell (see `ambiguous`)."""


def ambiguous(shape: tuple[int, ...]) -> bool:
  """Whether a bias-free kernel of this shape, no ``stack`` rule given, may not be the
  ``(prod(shape[:-1]), shape[-1])`` matrix `inherit` reads it as.

  Without a bias (whose shape tells the output axes and the stack axes) a 3-D kernel
  ``(a, b, c)`` is a 1-D conv (read right), a multi-axis `DenseGeneral` such as the
  query kernel ``(features, heads, head_dim)`` of ``MultiHeadDotProductAttention(
  use_bias=False)`` (really ``features x heads*head_dim``) or a scan-stacked Dense
  ``(layers, in, out)`` (really ``layers`` matrices ``in x out``); a 5-D kernel a 3-D
  conv or a stacked 2-D conv. A 4-D kernel is read as the 2-D conv ``(kh, kw, C_in,
  C_out)`` when ``kh, kw <= MAX_SPATIAL`` (every conv of the model zoo), ambiguous
  otherwise (e.g. a stacked multi-axis DenseGeneral ``(layers, features, heads,
  head_dim)``). A stacked 1-D conv ``(layers, k, C_in, C_out)`` with both leading axes
  small is the one layout this cannot tell from a 2-D conv: declare it with a
  ``{'stack': 1}`` rule, or use `inherit_model`, which reads every layout from the model.
  """
  if len(shape) == 4:
    return max(shape[:2]) > MAX_SPATIAL
  return len(shape) in (3, 5)


@dataclasses.dataclass(frozen=True)
class Kernel:
  """A kernel leaf, its matrix view and its plan.

  Attributes:
    keys: the path of the kernel's parent dict.
    path: ``"a/b/kernel"``.
    kernel, bias: the teacher's leaves (bias None when the layer has none).
    stack: leading layer axes (a scan-stacked kernel), 0 otherwise.
    plan: its `LayerPlan` (None until planned).
    gram: ``(gram, count)`` from ``calibration``, when given for it.
  """

  keys: tuple[str, ...]
  path: str
  kernel: Any
  bias: Any
  stack: int
  plan: LayerPlan | None = None
  gram: tuple | None = None

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

  @property
  def meta(self) -> tuple:
    """What turning factors into params needs (static: a jit argument)."""
    return (self.stack_shape, self.in_shape, self.n, self.plan.rank, self.plan.heads,
            self.kernel.dtype.name)

  def param_counts(self) -> tuple[int, int]:
    """``(teacher, planned)``: parameters of this kernel and its bias over its stacked
    layers, as the teacher has them and as ``plan`` makes them (equal when kept). The
    one place an inherited layer is counted; abstract kernels (`jax.ShapeDtypeStruct`) do."""
    use_bias = self.bias is not None
    dense = self.layers * policy.dense_params(self.m, self.n, use_bias)
    if self.plan is None or not self.plan.factorize:
      return dense, dense
    return dense, self.layers * policy.inherited_params(self.m, self.n, self.plan.rank,
                                                        self.plan.heads, use_bias,
                                                        self.plan.variant)

  def matrices(self):
    """``(prod(stack), m, n)``: every slice of the stack as a matrix (NumPy on the host:
    an eager jnp reshape would compile a program per shape)."""
    kernel = np.asarray(self.kernel) if on_host(self.kernel) else self.kernel
    return kernel.reshape(-1, self.m, self.n)


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
    damping: the data-aware ridge (`InherSpec.damping`).
    kernels: the kernels, their slices stacked in this order.
    seeds: per kernel, its randomized start seeds: a tuple of integer seeds per stack
      slice (`start_seeds`), or for a traced key the kernel's own key (`kernel_key`);
      None for the other methods.
  """

  m: int
  n: int
  rank: int
  method: str
  width: int
  power_iters: int
  damping: float
  kernels: tuple
  seeds: tuple | None = None

  @property
  def slices(self) -> int:
    return sum(k.layers for k in self.kernels)

  @property
  def paths(self) -> str:
    return ", ".join(k.path for k in self.kernels)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything an executor needs, decided once.

  Attributes:
    spec: the request it was planned from.
    kernels: every kernel leaf of the teacher, in the order of its params, each with
      its `LayerPlan` (and input Gram).
    groups: the batches of the factorised kernels (`Group`), in path order.
    key: the key of the gates and the randomized starts (None: the fixed default).
  """

  spec: InherSpec
  kernels: tuple
  groups: tuple
  key: Any = None

  @property
  def factorised(self) -> tuple:
    return tuple(k for k in self.kernels if k.plan.factorize)


def is_array(x, abstract: bool = False) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) or (abstract and isinstance(x, jax.ShapeDtypeStruct))


def on_host(x) -> bool:
  if isinstance(x, np.ndarray):
    return True
  return not isinstance(x, jax.core.Tracer) and all(d.platform == "cpu" for d in x.devices())


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
  unclear = []

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
      if (stack is None and not is_array(bias, abstract) and not spec.match(path)[1].get("skip")
          and ambiguous(tuple(v.shape))):
        unclear.append(f"{path} {tuple(v.shape)}")
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
  if unclear:
    warnings.warn(
        f"{len(unclear)} bias-free kernel(s) whose layout the params do not tell: "
        f"{'; '.join(unclear[:4])}{' ...' if len(unclear) > 4 else ''}. Each is read as "
        "(every axis but the last) x (last axis); a multi-axis DenseGeneral (e.g. a "
        "use_bias=False attention query kernel (features, heads, head_dim)) or a "
        "scan-stacked kernel would be factorised as the wrong matrix. Fix: "
        "inherit_model(model, variables, ...), which reads each kernel from the model; or "
        "declare the layout with a rule, e.g. (r'<path regex>', {'stack': 1}) for one "
        "leading layer axis, {'stack': 0} if the reading above is right, or 'skip'",
        AmbiguousKernelWarning, stacklevel=3)
  rules_lib.warn_unmatched(spec.rules, [k.path for k in kernels], "InherSpec.rules", "kernel",
                           stacklevel=3)
  return kernels


def by_shape(kernels):
  groups: dict[Any, list[Kernel]] = {}
  for k in kernels:
    groups.setdefault((k.m, k.n), []).append(k)
  return groups


def spectra(kernels: list[Kernel]) -> dict[str, np.ndarray]:
  """Every slice's singular values ``(slices, min(m, n))`` per kernel path, batched by
  shape (NumPy on the host, else jitted)."""
  values = {}
  for group in by_shape(kernels).values():
    mats = [k.matrices() for k in group]
    xp = np if all(isinstance(m, np.ndarray) for m in mats) else jnp
    sv = np.asarray(svd.singular_values(xp.concatenate(mats), xp=xp))
    offset = 0
    for k in group:
      values[k.path] = sv[offset : offset + k.layers]
      offset += k.layers
  return values


def plan_kernels(kernels: list[Kernel], spec: InherSpec,
                 singular_values: Callable[[Kernel], np.ndarray] | None = None) -> list[Kernel]:
  """Every kernel with its `LayerPlan` (`policy.stack_plan`; kernels already planned
  keep theirs). The energy policy's singular values come from `spectra`, or from
  ``singular_values(kernel)`` (the sharded executor's)."""
  data = [k for k in kernels if k.plan is None and policy.needs_values(spec, k.path)]
  if any(isinstance(k.kernel, (jax.core.Tracer, jax.ShapeDtypeStruct)) for k in data):
    raise ValueError(
        "the energy policy needs concrete teacher weights; call "
        "spec = inhernet_jax.resolve(params, spec) outside jit and pass the resolved spec")
  if singular_values is None:
    values = spectra(data)
  else:
    values = {k.path: singular_values(k) for k in data}
  return [k if k.plan is not None else dataclasses.replace(
      k, plan=policy.stack_plan(spec, k.path, k.m, k.n, k.bias is not None, values.get(k.path)))
          for k in kernels]


def build(kernels: list[Kernel], spec: InherSpec, *, key=None, calibration=None,
          singular_values: Callable[[Kernel], np.ndarray] | None = None,
          grams: bool = True) -> Plan:
  """The plan of ``collect``'s kernels: each kernel's `LayerPlan`, the Grams of the
  factorised ones (with ``grams``: required for data-aware kernels, see `gram_of`;
  plans that are only counted need none), and the `Group`s.

  Args:
    kernels: `collect`'s (placed on a mesh by the sharded executor, when it runs).
    spec: the request.
    key: the key of the gates and the randomized starts (None: a fixed default).
    calibration: ``{path: {"gram", "count"}}`` input Grams, or None.
    singular_values: the sharded executor's, for the energy policy (default: `spectra`).
    grams: attach (and require) the Grams: False for a plan that is not executed.
  """
  if grams and calibration is not None and not isinstance(calibration, Mapping):
    raise TypeError(
        "calibration must map kernel paths to {'gram', 'count'} dicts (from "
        f"inhernet_jax.calibration.grams.input_grams), got {type(calibration).__name__}")
  planned = []
  for k in plan_kernels(kernels, spec, singular_values):
    if grams and k.plan.factorize:
      k = dataclasses.replace(k, gram=gram_of(k, calibration or {}, required=k.plan.data_aware))
    planned.append(k)
  return Plan(spec, tuple(planned), groups(planned, spec, key), key)


def groups(kernels: list[Kernel], spec: InherSpec, key=None) -> tuple[Group, ...]:
  """The batches of every factorised kernel (see `Group`), in path order."""
  out: dict[Any, list[Kernel]] = {}
  for k in in_order(kernels):
    if k.plan.factorize:
      out.setdefault((k.m, k.n, k.plan.rank, *policy.method(spec, k.path, k.m, k.n, k.plan)), []).append(k)
  return tuple(
      Group(m, n, rank, how, width, spec.power_iters, float(spec.damping), tuple(ks),
            tuple(seeds(key, k) for k in ks) if how == "randomized" else None)
      for (m, n, rank, how, width), ks in out.items())


def in_order(kernels: list[Kernel]) -> list[Kernel]:
  """Kernels sorted by path: the order `jax.tree` functions (and `sharding.put`) give
  dict keys, whatever the order a params dict was built in."""
  return sorted(kernels, key=lambda k: k.keys)


def path_seed(k: Kernel) -> int:
  return zlib.crc32(k.path.encode()) & 0x7FFFFFFF


def kernel_key(key, k: Kernel) -> jax.Array:
  """The kernel's own key: ``fold_in(key, crc32(path))`` (``key`` None: ``key(0)``);
  the start of a traced key (`svd.traced_start_bits`)."""
  base = jax.random.key(0) if key is None else key
  return jax.random.fold_in(base, path_seed(k))


def start_seeds(key, k: Kernel) -> tuple[tuple[int, ...], ...]:
  """Kernel ``k``'s start seeds, one per stack slice: ``(*key words, crc32(path), i)``."""
  root = (*svd.start_seed(key), path_seed(k))
  return tuple((*root, i) for i in range(k.layers))


def seeds(key, k: Kernel):
  """`start_seeds`, or for a traced key (no integers to seed with) `kernel_key`."""
  return kernel_key(key, k) if isinstance(key, jax.core.Tracer) else start_seeds(key, k)


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
