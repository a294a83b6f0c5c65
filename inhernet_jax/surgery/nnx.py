"""`inherit`: in-place surgery on an NNX model, each matched layer by its inherited layer.

NNX modules carry their configuration, so the model is read from its graph, no call
needed: every `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv` and `nnx.Einsum` (exact types),
its kernel's input and output axes, and its stack axes (the stored kernel's extra leading
axes: `nnx.vmap`-created layers that `nnx.scan` runs). The kernels are inherited in
that view by the same planning and executors as linen (`surgery.common.inherit_layers`:
rules, rank policies, heads, data-aware Grams, reports), and each factorised layer is
replaced, at its attribute, by an `inhernet_jax.layers.nnx.InherLayer` holding its
factors. The output layer, by default kept, is the last matched layer in definition
order (the order of the modules' attributes, as ``__init__`` assigned them).

Example:
    ```python
    import inhernet_jax as ij

    model = MyModel(rngs=nnx.Rngs(0))        # trained
    ij.nnx.inherit(model, ij.InherSpec(rank=8, heads=3))   # also ij.nnx.InherLayer
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    ```
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util

from inhernet_jax.decomposition.spec import as_spec
from inhernet_jax.layers import mixing as mixing_lib
from inhernet_jax.layers.nnx import Experts, InherLayer
from inhernet_jax.surgery import common
from inhernet_jax.surgery.common import Layer

__all__ = ["Experts", "InherLayer", "inherit", "input_grams", "read_layer", "walk"]

KINDS = {nnx.Linear: "dense", nnx.LinearGeneral: "dense_general", nnx.Conv: "conv",
         nnx.Einsum: "einsum"}


def _children(node):
  """``(key, child)`` in definition order (attribute insertion order; list order)."""
  if isinstance(node, (list, tuple)):
    return [(str(i), c) for i, c in enumerate(node)]
  if isinstance(node, Mapping):
    return [(str(k), c) for k, c in node.items()]
  if isinstance(node, nnx.Pytree):
    return [(k, c) for k, c in vars(node).items() if not k.startswith("_")]
  return []


def walk(model) -> list[tuple[tuple[str, ...], Any]]:
  """Every module of ``model`` with its path, in definition order (each once)."""
  out, seen = [], set()

  def visit(node, path):
    for key, child in _children(node):
      if isinstance(child, nnx.Variable) or id(child) in seen:
        continue
      if isinstance(child, (nnx.Pytree, list, tuple, Mapping)):
        seen.add(id(child))
        if isinstance(child, nnx.Module):
          out.append(((*path, key), child))
        if not isinstance(child, InherLayer):  # Already inherited: its parts stay as they are.
          visit(child, (*path, key))

  visit(model, ())
  return out


def _as_tuple(x) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def read_layer(path, module, kind: str, order: int) -> Layer:
  """`module`'s matrix view, from its configuration and stored kernel."""
  shape = tuple(int(d) for d in module.kernel.shape)
  keep, perm = "", None
  if kind == "dense":
    inner = (module.in_features, module.out_features)
    ins, outs = inner[:1], inner[1:]
  elif kind == "dense_general":
    ins, outs = _as_tuple(module.in_features), _as_tuple(module.out_features)
    if module.batch_axis:
      keep = "a LinearGeneral with batch_axis: kept"
    inner = (*ins, *outs)
  elif kind == "conv":
    inner = (*module.kernel_size, module.in_features // module.feature_group_count,
             module.out_features)
    ins, outs = inner[:-1], inner[-1:]
    if module.mask is not None:
      keep = "a masked conv: kept"
  else:
    inner = tuple(module.kernel_shape)
    parsed = common.parse_einsum(module.einsum_str, inner)
    ins, outs = inner[:-1], inner[-1:]
    if isinstance(parsed, str):
      keep = parsed
    else:
      rhs = module.einsum_str.replace(" ", "").split("->")[0].split(",")[1]
      perm = tuple(rhs.index(c) for c in parsed[0] + parsed[1])
      ins = tuple(inner[p] for p in perm[: len(parsed[0])])
      outs = tuple(inner[p] for p in perm[len(parsed[0]):])
      bias = getattr(module, "bias", None)
      if bias is not None and tuple(bias.shape)[-len(outs):] != outs:
        keep = f"einsum bias of shape {tuple(bias.shape)} is not per output {outs}: kept"
  stack = len(shape) - len(inner)
  if stack < 0 or shape[stack:] != tuple(inner):
    keep = f"kernel of shape {shape} does not match the layer's {tuple(inner)}: kept"
    stack = 0
  return Layer(tuple(path), kind, stack, tuple(ins), tuple(outs), perm, keep, order)


def _set(model, path, value) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[int(key)] if isinstance(parent, (list, tuple, nnx.List)) else (
        parent[key] if isinstance(parent, Mapping) else getattr(parent, key))
  key = path[-1]
  if isinstance(parent, (list, nnx.List)):
    parent[int(key)] = value
  elif isinstance(parent, Mapping):
    parent[key] = value
  else:
    setattr(parent, key, value)


def _einsum_layout(module, layer: Layer):
  """``(equation of down, in_shape, out_perm)`` of an einsum layer."""
  eq = module.einsum_str.replace(" ", "")
  ins, outs, lhs, result = common.parse_einsum(eq, tuple(module.kernel_shape))
  free = next(c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)
  rows = "".join(c for c in result if c not in outs)
  perm = None if rows + outs == result else tuple((rows + outs).index(c) for c in result)
  return f"{lhs},{ins}{free}->{rows}{free}", layer.in_shape, perm


def inherit(model: nnx.Module, spec, *, heads: int | None = None, keep_output: bool = True,
            key=None, calibration: Mapping[str, Any] | None = None, mixing: str = "auto",
            return_report: bool = False):
  """Inherits an NNX model in place: each matched layer becomes an `InherLayer`.

  Args:
    model: an `nnx.Module` (its `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv`, `nnx.Einsum`
      layers are inherited, `nnx.vmap`-stacked ones included). Modified in place; on an
      error nothing is modified.
    spec: an `InherSpec`, an int rank or a float fraction (as `inhernet_jax.inherit`);
      rule paths are the layers' attribute paths plus ``/kernel``
      (``"blocks/mlp/fc1/kernel"``, ``"layers/0/kernel"``).
    heads: overrides the spec's heads.
    keep_output: keep the output layer (the last matched layer in definition order);
      False, or a spec rule matching its kernel path, factorises it.
    key: PRNG key of `inherit` (gates, randomized SVD starts).
    calibration: input Grams for data-aware kernels, keyed by kernel path.
    mixing: `layers.mixing` strategy of the new layers.
    return_report: also return the report rows.

  Returns:
    ``model`` (the same object), and the rows when ``return_report``.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"inhernet_jax.nnx.inherit: model must be an nnx.Module, got "
                    f"{type(model).__name__} (for linen models use inhernet_jax.inherit_model)")
  mixing_lib.check_strategy(mixing, "inhernet_jax.nnx.inherit")
  found = [(p, m, KINDS[type(m)]) for p, m in walk(model) if type(m) in KINDS]
  layers = [read_layer(p, m, kind, i) for i, (p, m, kind) in enumerate(found)]
  params = {}
  for (path, module, _), layer in zip(found, layers):
    params[(*path, "kernel")] = module.kernel[...]
    if getattr(module, "bias", None) is not None:
      params[(*path, "bias")] = module.bias[...]
  if not params:
    raise ValueError(f"inhernet_jax.nnx.inherit: {type(model).__name__} has no nnx.Linear, "
                     "nnx.LinearGeneral, nnx.Conv or nnx.Einsum layer")
  output = max(layers, key=lambda l: l.order).path if layers else None
  _check_gramless(found, layers, as_spec(spec, heads), calibration or {})
  new, planned, rows = common.inherit_layers(
      traverse_util.unflatten_dict(params), layers, spec, output=output, keep_output=keep_output,
      heads=heads, key=key, calibration=calibration, return_report=return_report)
  by_path = {p: (m, l) for (p, m, _), l in zip(found, layers)}
  replacements = []
  for p in planned:
    module, layer = by_path[p.path]
    factors = new
    for k in p.path:
      factors = factors[k]
    equation, in_shape, perm = None, (), None
    if layer.kind == "einsum":
      equation, in_shape, perm = _einsum_layout(module, layer)
    replacements.append((p.path, InherLayer.from_factors(
        module, layer.kind, factors, out_shape=layer.out_shape, out_perm=perm,
        in_shape=in_shape, equation=equation, mixing=mixing)))
  for path, layer in replacements:  # Everything built: now modify the model.
    _set(model, path, layer)
  return (model, rows) if return_report else model


# ------------------------------------------------------------- data-aware: input Grams
def _gramless(module, kind: str) -> str:
  """Why `input_grams` records no Gram for ``module`` ("" when it does)."""
  if kind == "einsum":
    return "an nnx.Einsum"
  if kind == "conv" and module.feature_group_count != 1:
    return f"a grouped nnx.Conv (feature_group_count={module.feature_group_count})"
  if kind == "conv" and module.mask is not None:
    return "a masked nnx.Conv"
  if kind == "dense_general" and module.batch_axis:
    return "an nnx.LinearGeneral with batch_axis"
  return ""


def _check_gramless(found, layers, spec, calibration) -> None:
  """Refuses data-aware inheritance of a layer `input_grams` gives no Gram, by name."""
  for (path, module, kind), layer in zip(found, layers):
    name = layer.kernel_path
    action = spec.match(name)[1]
    why = _gramless(module, kind)
    if (why and not layer.keep and name not in calibration and not action.get("skip")
        and action.get("data_aware", spec.data_aware)):
      raise ValueError(
          f"{name}: data-aware inheritance needs this kernel's input Gram, and "
          f"inhernet_jax.nnx.input_grams records none for {why} (Linear, LinearGeneral and "
          f"ungrouped Conv layers only, nnx.scan-stacked ones included): add a rule "
          f"({name!r}, {{'data_aware': False}}) or pass its Gram in calibration")


class _Gram(nnx.Variable):
  """A recorded input Gram (not a Param: never trained, never in an optimizer)."""


class _Recorder(nnx.Module):
  """Wraps a layer for `input_grams`: sums ``X^T X`` of the matrix its kernel multiplies."""

  def __init__(self, layer, kind: str, stack: tuple[int, ...] = (), m: int = 0, name: str = ""):
    self.layer, self.kind, self.name, self.m = layer, kind, name, m
    # A stacked layer's Gram is stacked like its kernel, so that the model's nnx.scan /
    # nnx.vmap hands each slice its own (m, m) Gram and stacks the sums back.
    self.gram = _Gram(jnp.zeros((*stack, m, m), jnp.float32) if stack else None)
    self.count = _Gram(jnp.zeros(stack, jnp.int32) if stack else 0)

  def __call__(self, x, *args, **kwargs):
    rows = _input_matrix(self.layer, self.kind, x)
    gram = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
    old = self.gram.get_value()
    if old is not None and tuple(old.shape) != tuple(gram.shape):
      raise ValueError(
          f"input_grams: {self.name} is stacked, but the model's nnx.scan / nnx.vmap gave "
          f"its Gram of shape {tuple(old.shape)} unsliced (expected {tuple(gram.shape)}): "
          "its transform must split every state of the stacked module (in_axes 0), not "
          "nnx.Param only")
    self.gram.set_value(gram if old is None else old + gram)
    self.count.set_value(self.count.get_value() + rows.shape[0])
    return self.layer(x, *args, **kwargs)


def _input_matrix(layer, kind: str, x):
  from inhernet_jax.calibration.grams import conv_patches  # Calibration maths, shared.

  x = x.astype(jnp.float32)
  if kind == "dense":
    return x.reshape(-1, x.shape[-1])
  if kind == "conv":
    return conv_patches(layer, x)
  axes = tuple(a % x.ndim for a in _as_tuple(layer.axis))
  rest = [a for a in range(x.ndim) if a not in axes]
  return x.transpose(*rest, *axes).reshape(-1, math.prod(x.shape[a] for a in axes))


def input_grams(model: nnx.Module, batches) -> dict[str, dict[str, Any]]:
  """Input Grams of ``model``'s Linear / LinearGeneral / ungrouped Conv layers (eager).

  The NNX counterpart of `inhernet_jax.calibration.grams.input_grams`, for
  ``inherit(model, spec.replace(data_aware=True), calibration=grams)``: each layer is
  wrapped for the calls, then put back. Stacked layers (`nnx.vmap`-created, run by
  `nnx.scan`) get Grams stacked like their kernels ``(*stack, m, m)``. Grouped and
  masked convs, einsums and batch-axis LinearGenerals get none: data-aware inheritance
  of one is refused, naming it.

  Args:
    model: the NNX teacher (put it in eval mode first).
    batches: an iterable of inputs (arrays, or tuples of positional arguments).

  Returns:
    ``{kernel path: {"gram": (m, m), "count": rows}}``.
  """
  found = []
  for path, module in walk(model):
    kind = KINDS.get(type(module))
    if kind is None or kind == "einsum":
      continue
    layer = read_layer(path, module, kind, 0)
    if layer.keep or _gramless(module, kind):
      continue
    shape = tuple(int(d) for d in module.kernel.shape)
    found.append((path, module, _Recorder(module, kind, shape[: layer.stack],
                                          math.prod(layer.in_shape), layer.kernel_path)))
  try:
    for path, _, recorder in found:
      _set(model, path, recorder)
    seen = 0
    for batch in batches:
      model(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
      seen += 1
  finally:
    for path, module, _ in found:
      _set(model, path, module)
  if not seen:
    raise ValueError("input_grams: batches is empty; pass at least one calibration batch")
  out = {}
  for path, _, r in found:
    gram, count = r.gram.get_value(), r.count.get_value()
    if gram is not None and (np.ndim(count) == 0 or np.all(np.asarray(count) > 0)):
      out["/".join((*path, "kernel"))] = {
          "gram": gram, "count": int(count) if np.ndim(count) == 0 else np.asarray(count)}
  return out
