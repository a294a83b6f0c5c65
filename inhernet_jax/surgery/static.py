"""Reading a linen model's layers without a call: from its params, names and ``setup``.

`inherit_model(model, variables, spec)` without an example input reads each kernel's
matrix view from what is known before any call:

* layers ``setup`` defines (``model.bind(variables)``): their exact type and fields
  (``features``, ``kernel_size``, ``axis``, ``einsum_str``), as a trace would see them;
* Flax's automatic names for compact layers (``Dense_0``, ``Conv_1``, ``DenseGeneral_0``,
  ``Einsum_0``) and `nn.MultiHeadDotProductAttention`'s ``query`` / ``key`` / ``value`` /
  ``out``: the layer's kind, hence its kernel's inner rank;
* the stored shapes: a 2-D kernel is one ``in x out`` matrix; a bias is
  ``(*stack, *out_axes)``; layers of one module share its stack axes (`nn.scan`); a
  bias-free conv or unnamed kernel that nothing else dates is read in the conventional
  view (every axis but the last an input; its module's stack axes, else none).

A kernel whose view these leave open (an `nn.Einsum` written in a compact ``__call__``:
its equation is known only from a call; a bias-free `DenseGeneral_N`, maybe multi-axis;
a bias that fits several stack / output splits) raises a one-line error naming it and
asking for an example input, unless a ``"skip"`` rule keeps it. Each view is checked
again when the student is first traced (`linen.InheritedModel`, trace time only): a
layer called as another matrix than the one it was inherited as (a conventional view
that was wrong: a stacked or multi-output kernel) is an error naming it, never a
wrong factorisation. The
output layer (kept by default) is read as the layer whose outputs no layer takes in (a
classifier's classes), the shallowest, then the last in natural name order.

Example:
    ```python
    layers, output = read_params(model, variables, spec)
    ```
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
from flax import traverse_util
from flax.core import FrozenDict

from inhernet_jax.decomposition.spec import as_spec
from inhernet_jax.layers import linen as layers_lib
from inhernet_jax.surgery import common
from inhernet_jax.surgery.common import Layer

AUTO = re.compile(r"(Dense|DenseGeneral|Conv|Einsum)_\d+")
KINDS = {nn.Dense: "dense", nn.DenseGeneral: "dense_general", nn.Conv: "conv",
         nn.Einsum: "einsum"}

# This package's layers without a spec are `nn.Dense` / `nn.Conv` (a zoo teacher).
PLAIN = {layers_lib.InherDense: "dense", layers_lib.InherConv: "conv"}



def layer_kind(module) -> str | None:
  """The kind of linen layer ``module`` is (a key of the executors), or None.

  Exact types: a subclass may compute something else with its kernel.
  """
  kind = KINDS.get(type(module))
  if kind is None and type(module) in PLAIN and module.spec is None:
    kind = PLAIN[type(module)]
  return kind


AUTO_KINDS = {"Dense": "dense", "DenseGeneral": "dense_general", "Conv": "conv",
              "Einsum": "einsum"}
ATTENTION = ("query", "key", "value", "out")
ASK = "pass an example input, inherit_model(model, variables, spec, x)"


class Ambiguous(ValueError):
  """A kernel whose matrix view is not known without a call."""


def setup_modules(model: nn.Module, variables: Mapping[str, Any]) -> dict[tuple, nn.Module]:
  """The submodules ``setup`` defines (recursively), by path, bound to ``variables``."""
  out: dict[tuple, nn.Module] = {}

  def visit(module, path):
    module._try_setup()  # pylint: disable=protected-access
    for name, child in module._state.children.items():  # pylint: disable=protected-access
      if isinstance(child, nn.Module):
        out[(*path, name)] = child
        visit(child, (*path, name))

  visit(model.bind(variables), ())
  return out


def _as_tuple(x) -> tuple:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _from_module(module, kind: str, shape: tuple) -> tuple:
  """``(inner rank, keep, ins, outs, perm)`` of a layer whose fields are known."""
  if kind == "dense":
    return 2, "", None, None, None
  if kind == "conv":
    keep = "a masked conv: kept" if getattr(module, "mask", None) is not None else ""
    return len(_as_tuple(module.kernel_size)) + 2, keep, None, None, None
  if kind == "dense_general":
    keep = "a DenseGeneral with batch_dims: kept" if module.batch_dims else ""
    n_in, n_out = len(_as_tuple(module.axis)), len(_as_tuple(module.features))
    inner = shape[len(shape) - n_in - n_out:]
    return n_in + n_out, keep, inner[:n_in], inner[n_in:], None
  inner = tuple(module.shape)
  parsed = common.parse_einsum(module.einsum_str, inner)
  if isinstance(parsed, str):
    return len(inner), parsed, inner[:-1], inner[-1:], None
  rhs = module.einsum_str.replace(" ", "").split("->")[0].split(",")[1]
  perm = tuple(rhs.index(c) for c in parsed[0] + parsed[1])
  return (len(inner), "", tuple(inner[p] for p in perm[: len(parsed[0])]),
          tuple(inner[p] for p in perm[len(parsed[0]):]), perm)


def _bias_splits(shape: tuple, bias: tuple) -> list[tuple[int, int]]:
  """Every ``(stack, outs)`` with ``bias == shape[:stack] + shape[-outs:]`` and an input."""
  return [(s, len(bias) - s) for s in range(len(bias))
          if len(shape) - len(bias) >= 1 and bias == shape[:s] + shape[len(shape) - len(bias) + s:]]


def read_params(model: nn.Module, variables: Mapping[str, Any], spec=None):
  """Every kernel's layer view, read without calling the model.

  Args:
    model: a linen module.
    variables: its variables (``params`` and the rest).
    spec: the `InherSpec` (or rank) of the call: kernels its ``"skip"`` rules keep need
      no view.

  Returns:
    ``(layers, output)`` as `linen.read_model`.

  Raises:
    Ambiguous: a kernel, not skipped by a rule, whose view is not known without a call.
  """
  spec = as_spec(spec) if spec is not None else None
  params = variables["params"]
  flat = traverse_util.flatten_dict(dict(params) if isinstance(params, FrozenDict) else params)
  kernels = [(k[:-1], tuple(int(d) for d in v.shape)) for k, v in flat.items()
             if k[-1] == "kernel" and hasattr(v, "shape")]
  bias = {k[:-1]: tuple(int(d) for d in v.shape) for k, v in flat.items()
          if k[-1] == "bias" and hasattr(v, "shape")}
  shapes = dict(kernels)
  known = setup_modules(model, variables)

  def attention(path):
    parent = path[:-1]
    if not path or path[-1] not in ATTENTION or any((*parent, n) not in shapes for n in ATTENTION):
      return False
    q, o = shapes[(*parent, "query")], shapes[(*parent, "out")]
    return len(q) >= 3 and len(o) == len(q) and q[-2:] == o[len(o) - 3:len(o) - 1]

  # Pass 1: the inner rank (and fields) of each kernel from its module or its name.
  info = {}
  for path, shape in kernels:
    module = known.get(path)
    kind = None
    if module is not None:
      kind = layer_kind(module)
      if kind is None:
        info[path] = ("", None, None, "", None, None, None)  # Not one of these layers.
        continue
      inner, keep, ins, outs, perm = _from_module(module, kind, shape)
      info[path] = (kind, inner, "fields", keep, ins, outs, perm)
    elif path and AUTO.fullmatch(path[-1]):
      kind = AUTO_KINDS[path[-1].rsplit("_", 1)[0]]
      info[path] = (kind, 2 if kind == "dense" else None, "name", "", None, None, None)
    elif attention(path):
      n_in = 2 if path[-1] == "out" else 1
      info[path] = ("dense_general", 3, "attention", "", None, None, n_in)
    else:
      info[path] = ("matrix", 2 if len(shape) == 2 else None, "shape", "", None, None, None)
  # Pass 2: stack axes (inner rank, bias, or the module's other layers), then the view.
  stacks: dict[tuple, int] = {}
  for path, shape in kernels:
    kind, inner, how, *_ = info[path]
    if inner is not None:
      stacks.setdefault(path[:-1], len(shape) - inner)
      if how == "attention":  # The attention module's own siblings share its stack.
        stacks.setdefault(path[:-2], len(shape) - inner)
    elif path in bias and len(_bias_splits(shape, bias[path])) == 1:
      stacks.setdefault(path[:-1], _bias_splits(shape, bias[path])[0][0])
  layers = []
  for i, (path, shape) in enumerate(kernels):
    kind, inner, how, keep, ins, outs, extra = info[path]
    if not kind:
      continue
    kernel_path = "/".join((*path, "kernel"))
    skip = spec is not None and spec.match(kernel_path)[1].get("skip", False)
    try:
      layer = _view(path, shape, bias.get(path), kind, inner, how, keep, ins, outs, extra,
                    stacks.get(path[:-1]), i)
    except Ambiguous:
      if skip:
        continue
      raise
    layers.append(layer)
  return layers, output_layer(layers)


def _natural(path: tuple) -> tuple:
  """A path's sort key with numbers as numbers (``Dense_10`` after ``Dense_2``: call order)."""
  return tuple(tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)) for k in path)


def output_layer(layers: list[Layer]) -> tuple | None:
  """The output layer read without a call: a layer whose outputs no layer takes as
  inputs (a classifier's ``classes``), the shallowest, then the last in natural name
  order; with no such layer, the shallowest and last of all (params' key order is not
  call order once a tree has been through ``jit``: keys come back sorted)."""
  candidates = [l for l in layers if not l.keep]
  if not candidates:
    return None
  taken = {l.in_shape[-1] for l in layers} | {math.prod(l.in_shape) for l in layers
                                              if l.kind != "conv"}
  sinks = [l for l in candidates if l.n not in taken] or candidates
  depth = min(len(l.path) for l in sinks)
  return max((l for l in sinks if len(l.path) == depth), key=lambda l: _natural(l.path)).path
  return layers, output


def _view(path, shape, bias, kind, inner, how, keep, ins, outs, extra, group_stack, order):
  """One kernel's `Layer`, or `Ambiguous`."""
  name = "/".join((*path, "kernel"))

  def ambiguous(why):
    return Ambiguous(f"inherit_model: {name} of shape {shape} ({why}) has no matrix view "
                     f"without a call: {ASK}")

  perm = None
  if how == "fields":
    stack = len(shape) - inner
    if kind == "einsum":
      perm = extra
  elif kind == "einsum":
    raise ambiguous("an nn.Einsum written in a compact __call__: its equation is read only "
                    "from a call")
  elif inner is not None:
    stack = len(shape) - inner
  else:
    splits = None if bias is None else _bias_splits(shape, bias)
    if kind == "conv" and splits is not None:
      splits = [s for s in splits if s[1] == 1]
    if group_stack is not None:
      if splits is not None:
        splits = [s for s in splits if s[0] == group_stack]
      elif kind == "conv" or len(shape) - group_stack == 2:
        splits = [(group_stack, 1)]
    if splits is None and kind in ("conv", "matrix"):
      # Bias-free and dated by nothing else: the conventional view (every axis but the
      # last an input; the module's stack axes, else none), checked at the first trace.
      splits = [(group_stack or 0, 1)]
    if not splits or len(splits) != 1:
      what = "layer" if kind == "matrix" else kind
      raise ambiguous(f"{'a bias-free ' if bias is None else 'a '}{what}"
                      f"{'' if group_stack is None else f' with {group_stack} stack axes'}")
    stack, n_out = splits[0]
    ins, outs = shape[stack:len(shape) - n_out], shape[len(shape) - n_out:]
  if stack < 0:
    raise ambiguous(f"a {kind} kernel cannot have {len(shape)} axes")
  inner_shape = shape[stack:]
  if how == "attention":
    ins, outs = inner_shape[:extra], inner_shape[extra:]
  elif ins is None:
    ins, outs = inner_shape[:-1], inner_shape[-1:]
  elif sorted((*ins, *outs)) != sorted(inner_shape):
    raise ambiguous(f"its layer's fields give {tuple(ins)} -> {tuple(outs)}")
  if bias is not None and not keep and bias[len(bias) - len(outs):] != tuple(outs):
    keep = f"bias of shape {bias} is not per output {tuple(outs)}: kept"
  return Layer(tuple(path), "dense" if kind == "matrix" else kind, stack, tuple(ins),
               tuple(outs), perm, keep, order)
