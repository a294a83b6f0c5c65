"""`inherit_model`: inherit a user's own linen model, unchanged, in one call.

Without an example input, each kernel's view is read from the params, Flax's automatic
names and the layers ``setup`` defines (`surgery.static`; a kernel these leave open is
an error asking for an input), and checked against the layer when the student is first
traced. With one, the model is read, not guessed: one abstract call (`jax.eval_shape`, nothing computed)
with an interceptor on every `nn.Dense`, `nn.DenseGeneral`, `nn.Conv` and `nn.Einsum`
records each layer's path, its kernel's input and output axes (a multi-axis
DenseGeneral's, an einsum's), its stack axes (stored kernel against the kernel the
layer sees inside `nn.scan` / `nn.vmap`) and its place in the call order (the last
layer whose output is the model's output is the output layer, kept by default). The
kernels are inherited in that view (`surgery.common.inherit_layers`), and the user's
model is returned wrapped in `InheritedModel`: it shares the model's scope (the params
keep the user's names) and runs the model's own code under `nn.intercept_methods`,
where each inherited layer computes its factorisation (`layers.linen`'s
`factorised_dense` / `factorised_conv`, and here the DenseGeneral and Einsum forms)
with its factor params as submodules ``down``, ``up``, ``gate`` at the layer's path.

Example:
    ```python
    student, new_variables = inherit_model(model, variables, InherSpec(rank=8, heads=3))
    y = student.apply(new_variables, x)            # the user's code, inherited layers
    student.init(key, x)                           # the tree of new_variables
    ```
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util
from flax.core import FrozenDict

from inhernet_jax.decomposition.policy import LayerPlan
from inhernet_jax.layers import linen as layers_lib
from inhernet_jax.layers import mixing as mixing_lib
from inhernet_jax.decomposition.spec import as_spec
from inhernet_jax.surgery import common, static
from inhernet_jax.surgery.common import Layer, Planned

KINDS, PLAIN = static.KINDS, static.PLAIN  # The linen layer types it replaces, by kind.


def _kind(module, method_name: str) -> str | None:
  # Only the layer's own call: another method may use the kernel differently.
  return static.layer_kind(module) if method_name == "__call__" else None


def _equation(module, args, kwargs) -> str | None:
  eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
  return module.einsum_str if eq is None else eq


def _axes(module, ndim: int) -> tuple[int, ...]:
  axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
  return tuple(a % ndim for a in axis)


def _features(module) -> tuple[int, ...]:
  f = module.features
  return tuple(f) if isinstance(f, (tuple, list)) else (f,)


def _describe(module, kind, inner, args, kwargs) -> dict:
  """The layer's matrix view from the module and the kernel it sees, unstacked."""
  inner = tuple(int(d) for d in inner)
  if kind == "dense":
    return {"in_shape": inner[:1], "out_shape": inner[1:]}
  if kind == "conv":
    keep = "a masked conv: kept" if module.mask is not None else ""
    return {"in_shape": inner[:-1], "out_shape": inner[-1:], "keep": keep}
  if kind == "dense_general":
    out = len(_features(module))
    keep = "a DenseGeneral with batch_dims: kept" if module.batch_dims else ""
    return {"in_shape": inner[:-out], "out_shape": inner[-out:], "keep": keep}
  parsed = common.parse_einsum(_equation(module, args, kwargs), inner)
  if isinstance(parsed, str):
    return {"in_shape": inner[:-1], "out_shape": inner[-1:], "keep": parsed}
  ins, outs, _, _ = parsed
  rhs = _equation(module, args, kwargs).replace(" ", "").split("->")[0].split(",")[1]
  perm = tuple(rhs.index(c) for c in ins + outs)
  return {"in_shape": tuple(inner[p] for p in perm[: len(ins)]),
          "out_shape": tuple(inner[p] for p in perm[len(ins):]), "perm": perm}


def read_model(model: nn.Module, variables: Mapping[str, Any], inputs: tuple,
               apply_kwargs: Mapping[str, Any] | None = None):
  """Every Dense / DenseGeneral / Conv / Einsum layer of ``model`` as the model uses it.

  Args:
    model: a linen module.
    variables: its variables (``params`` and any other collection).
    inputs: positional arguments of one call (only shapes and dtypes are used).
    apply_kwargs: keyword arguments of ``model.apply`` (``{"train": False}``; ``rngs``
      default to a ``"dropout"`` key).

  Returns:
    ``(layers, output)``: the `Layer` records (paths relative to the model) and the path
    of the output layer (None when no layer's output is the model's output).
  """
  kwargs = dict(apply_kwargs or {})
  rngs = kwargs.pop("rngs", {"dropout": jax.random.key(0)})
  collections = [c for c in variables if c != "params"]
  flat = traverse_util.flatten_dict(dict(variables["params"]) if isinstance(
      variables["params"], FrozenDict) else variables["params"])
  seen: dict[tuple, dict] = {}
  calls = [0]

  def intercept(next_fun, args, kw, context):
    module = context.module
    kind = _kind(module, context.method_name)
    y = next_fun(*args, **kw)
    if kind is None:
      return y
    kernel = module.variables.get("params", {}).get("kernel")
    if kernel is None:
      return y
    record = _describe(module, kind, kernel.shape, args, kw)
    calls[0] += 1
    record.update(kind=kind, inner=len(kernel.shape), order=calls[0],
                  call_shape=tuple(getattr(y, "shape", ())))
    seen[tuple(module.path)] = record
    return y

  def run(variables, *args):
    return model.apply(variables, *args, rngs=rngs, mutable=["intermediates", *collections],
                       **kwargs)[0]

  with nn.intercept_methods(intercept):
    out = jax.eval_shape(run, variables, *inputs)
  layers = []
  for path, r in seen.items():
    stored = flat.get((*path, "kernel"))
    if stored is None:
      continue
    layers.append(Layer(path, r["kind"], stored.ndim - r["inner"], r["in_shape"], r["out_shape"],
                        r.get("perm"), r.get("keep", ""), r["order"], r["call_shape"]))
  shapes = [tuple(x.shape) for x in jax.tree.leaves(out)]
  return layers, common.output_layer(layers, shapes)


# ------------------------------------------------------------- the student
def _dense_general(module, inputs, plan, mixing, args, kwargs):
  features = _features(module)
  z = nn.DenseGeneral(
      layers_lib.down_width(plan), axis=module.axis, use_bias=False, dtype=module.dtype,
      param_dtype=module.param_dtype, precision=module.precision,
      kernel_init=module.kernel_init, dot_general=module.dot_general,
      dot_general_cls=module.dot_general_cls, name="down")(inputs)
  y = layers_lib.gated_experts(module, z, plan, mixing, features=math.prod(features))
  return y.reshape(*y.shape[:-1], *features)


def _einsum(module, inputs, plan, mixing, args, kwargs):
  equation = _equation(module, args, kwargs)
  parsed = common.parse_einsum(equation, tuple(module.shape))
  if isinstance(parsed, str):
    raise ValueError(f"{'/'.join(module.path)}: {parsed}")
  ins, outs, lhs, result = parsed
  free = next(c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
              if c not in equation)
  rows = "".join(c for c in result if c not in outs)
  sizes = dict(zip(equation.replace(" ", "").split("->")[0].split(",")[1], module.shape))
  z = nn.Einsum(
      (*(sizes[c] for c in ins), layers_lib.down_width(plan)), f"{lhs},{ins}{free}->{rows}{free}",
      use_bias=False, dtype=module.dtype, param_dtype=module.param_dtype,
      precision=module.precision, kernel_init=module.kernel_init, name="down")(inputs)
  out_shape = tuple(sizes[c] for c in outs)
  y = layers_lib.gated_experts(module, z, plan, mixing, features=math.prod(out_shape))
  y = y.reshape(*y.shape[:-1], *out_shape)
  return y if rows + outs == result else y.transpose([(rows + outs).index(c) for c in result])


def _dense(module, inputs, plan, mixing, args, kwargs):
  return layers_lib.factorised_dense(module, inputs, plan, mixing)


def _conv(module, inputs, plan, mixing, args, kwargs):
  return layers_lib.factorised_conv(module, inputs, plan, mixing)


FORWARD = {"dense": _dense, "dense_general": _dense_general, "conv": _conv, "einsum": _einsum}


def _check_view(module, kind, inputs, planned: Planned, args, kwargs) -> None:
  """Raises unless ``module``, as called, is the matrix ``planned`` was inherited as.

  Runs when the student is traced (never per step): a view read without a call (no
  example input) that the call contradicts is an error, never a wrong matrix.
  """
  shape = tuple(inputs.shape)
  if kind == "dense":
    inner = (shape[-1], module.features)
  elif kind == "conv":
    size = module.kernel_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size,)
    inner = (*size, shape[-1] // module.feature_group_count, module.features)
  elif kind == "dense_general":
    inner = (*(shape[a] for a in _axes(module, len(shape))), *_features(module))
  else:
    inner = tuple(module.shape)
  r = _describe(module, kind, inner, args, kwargs)
  called = common.layer_view(r["in_shape"], r["out_shape"], r.get("perm"))
  if r.get("keep") or (planned.view is not None and called != planned.view):
    name = "/".join((*planned.path, "kernel"))
    raise ValueError(
        f"InheritedModel: {name} was inherited as the {planned.view[0]} -> {planned.view[1]} "
        f"matrix (perm {planned.view[2]}), but the model calls it as a {kind} "
        f"{called[0]} -> {called[1]} (perm {called[2]}){'; ' + r['keep'] if r.get('keep') else ''}"
        ": pass an example input to inherit_model so that it reads the layer from a call")


def _interceptor(prefix: tuple, planned: Mapping[tuple, Planned], mixing: str):
  n = len(prefix)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    kind = _kind(module, context.method_name)
    if kind is None or tuple(module.path[:n]) != prefix:
      return next_fun(*args, **kwargs)
    p = planned.get(tuple(module.path[n:]))
    if p is None:
      return next_fun(*args, **kwargs)
    plan = LayerPlan(True, p.rank, p.heads, p.rank)
    inputs = args[0] if args else kwargs["inputs"]
    _check_view(module, kind, inputs, p, args, kwargs)
    return FORWARD[kind](module, inputs, plan, mixing, args, kwargs)

  return intercept


class InheritedModel(nn.Module):
  """A user's linen model with its inherited layers (`inherit_model` builds it).

  Shares the model's scope, so its variables are the model's, with each inherited
  layer's ``kernel`` / ``bias`` replaced by ``down`` / ``up`` / ``gate`` submodules at the
  same path. Calls take the model's own arguments (``train=``, ``rngs``, ``mutable``).

  Attributes:
    model: the user's model, unchanged.
    planned: the inherited layers (path relative to ``model``, rank, heads).
    mixing: how the heads are mixed (`layers.mixing`): ``"auto"``, ``"weights"`` or
      ``"outputs"``.
  """

  model: nn.Module
  planned: tuple[Planned, ...] = ()
  mixing: str = "auto"

  def setup(self):
    mixing_lib.check_strategy(self.mixing, "InheritedModel")
    nn.share_scope(self, self.model)

  def __call__(self, *args, **kwargs):
    return self.run_method("__call__", *args, **kwargs)

  def run_method(self, name: str, *args, **kwargs):
    """The user's model's method ``name``, with the inherited layers."""
    planned = {p.path: p for p in self.planned}
    with nn.intercept_methods(_interceptor(tuple(self.path), planned, self.mixing)):
      return getattr(self.model, name)(*args, **kwargs)

  def _user_method(self, method):
    """``apply``'s ``method`` for one of the user model's methods (its name, a method
    bound to the model, or the function of its class); anything else as given."""
    name = None
    if isinstance(method, str) and not hasattr(InheritedModel, method):
      name = method
    elif inspect.ismethod(method) and isinstance(method.__self__, nn.Module) and (
        not isinstance(method.__self__, InheritedModel)):
      name = method.__name__
    elif callable(method) and getattr(type(self.model), getattr(method, "__name__", ""),
                                      None) is method:
      name = method.__name__
    if name is None:
      return method
    if not callable(getattr(type(self.model), name, None)):
      raise AttributeError(f"InheritedModel: {type(self.model).__name__} has no method {name!r}")
    return lambda module, *args, **kwargs: module.run_method(name, *args, **kwargs)

  def apply(self, variables, *args, method=None, **kwargs):
    """`nn.Module.apply`; ``method`` may also name a method of the user's model
    (``"encode"``, ``model.encode``, ``MyModel.encode``): it runs with the inherited layers."""
    return super().apply(variables, *args, method=self._user_method(method), **kwargs)

  def init(self, rngs, *args, method=None, **kwargs):
    """`nn.Module.init`; ``method`` as in `apply`."""
    return super().init(rngs, *args, method=self._user_method(method), **kwargs)

  def init_with_output(self, rngs, *args, method=None, **kwargs):
    """`nn.Module.init_with_output`; ``method`` as in `apply`."""
    return super().init_with_output(rngs, *args, method=self._user_method(method), **kwargs)


def inherit_model(model: nn.Module, variables: Mapping[str, Any], spec, *inputs,
                  apply_kwargs: Mapping[str, Any] | None = None, heads: int | None = None,
                  keep_output: bool = True, key: jax.Array | None = None,
                  calibration: Mapping[str, Any] | None = None, mixing: str = "auto",
                  return_report: bool = False):
  """Inherits a user's own linen model: ``(student, new_variables)``, no rewrite.

  Args:
    model: any linen module (its `nn.Dense`, `nn.DenseGeneral`, `nn.Conv` and `nn.Einsum`
      layers are inherited, also inside `nn.scan` / `nn.remat` / `nn.vmap`).
    variables: the model's trained variables (``params`` and the rest, e.g.
      ``batch_stats``: passed through).
    spec: an `InherSpec`, an int rank or a float fraction (as `inherit`).
    *inputs: optional, one example call's positional arguments (shapes only: the model
      is read by an abstract trace, nothing is computed). Without them each kernel's
      matrix view is read from the params, the automatic names and ``setup``
      (`surgery.static`): a kernel these leave open (a compact `nn.Einsum`, a bias-free
      multi-axis DenseGeneral or stacked kernel) is a one-line error asking for them,
      and the student checks every view against the layer when first traced.
    apply_kwargs: the call's keyword arguments (``{"train": False}``).
    heads: overrides the spec's heads.
    keep_output: keep the output layer (the last layer producing the model's output;
      the reason is in the report). False, or a spec rule matching its kernel path,
      factorises it.
    key: PRNG key of `inherit` (gates, randomized SVD starts).
    calibration: input Grams for data-aware kernels (`calibration.grams.input_grams` of
      ``model``), keyed by kernel path.
    mixing: `InheritedModel.mixing`.
    return_report: also return `inherit_report`'s rows (plus ``"layer"``: the kind).

  Returns:
    ``(student, new_variables)`` (and the rows when ``return_report``): ``student`` an
    `InheritedModel`; ``student.apply(new_variables, *inputs)`` is the rank-r truncation
    of the teacher at every inherited kernel, and ``student.init`` gives exactly the
    tree, shapes and dtypes of ``new_variables["params"]``.

  Raises:
    TypeError: ``variables`` without ``params``.
    ValueError: without example inputs, a kernel whose view needs a call.
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f"inherit_model: model must be a flax.linen Module, got {type(model).__name__}"
                    " (for NNX models use inhernet_jax.nnx.inherit)")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TypeError("inherit_model: variables must be the model's variables dict, with "
                    f"'params' (got {type(variables).__name__} with keys "
                    f"{sorted(variables) if isinstance(variables, Mapping) else '-'})")
  mixing_lib.check_strategy(mixing, "inherit_model")
  if inputs:
    layers, output = read_model(model, variables, inputs, apply_kwargs)
  else:
    layers, output = static.read_params(model, variables, as_spec(spec, heads))
  new_params, planned, rows = common.inherit_layers(
      variables["params"], layers, spec, output=output, keep_output=keep_output, heads=heads,
      key=key, calibration=calibration, return_report=return_report)
  student = InheritedModel(model=model, planned=planned, mixing=mixing)
  new_variables = {**variables, "params": new_params}
  if isinstance(variables, FrozenDict):
    new_variables = FrozenDict(new_variables)
  return (student, new_variables, rows) if return_report else (student, new_variables)
