"""What linen and NNX surgery share: a layer's matrix view, the default keeps, one `inherit`.

A framework reads its model into `Layer` records (linen: by tracing one abstract call;
NNX: from the module graph): for each layer its path, its kind, its kernel's stack
axes, input axes and output axes as the *model* uses them. `inherit_layers` then
inherits every kernel in its canonical matrix view ``(*stack, *in_axes, prod(out_axes))``
(a multi-axis `DenseGeneral` / `Einsum` kernel's output axes flattened, an einsum's axes
permuted to inputs-then-outputs), so a bias-free ``(64, 4, 16)`` query kernel is the
``64 x 64`` matrix it is, never ``256 x 16``, and a bias-free scan-stacked kernel has its
stack axes from the model, never guessed. Kernels the model does not read as one of
these layers are kept, and so by default is the output layer (the last layer whose
output is the model's output: factorising the classifier of an unknown model costs
accuracy for few parameters), each with its reason in the report.

Example:
    ```python
    layers = [Layer(("Dense_0",), "dense", 0, (64,), (32,)), ...]
    new_params, plan, rows = inherit_layers(params, layers, InherSpec(rank=8))
    ```
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util
from flax.core import FrozenDict

from inhernet_jax.decomposition.spec import as_spec
from inhernet_jax.decomposition.transform import inherit

OUTPUT_REASON = ("output layer (logits): kept by default; keep_output=False or a rule for "
                 "this path factorises it")
UNREAD_REASON = "not read from the model as a Dense / DenseGeneral / Conv / Einsum layer: kept"


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer of a user's model, as the model reads its kernel.

  Attributes:
    path: the module path; the kernel is at ``(*path, "kernel")``.
    kind: ``"dense"``, ``"dense_general"``, ``"conv"`` or ``"einsum"``.
    stack: leading layer axes of the stored kernel (`nn.scan` / `nn.vmap` / `nnx.vmap`).
    in_shape: the kernel's input axes (contracted with the layer's inputs), in order.
    out_shape: the output axes (the layer's output order).
    perm: for einsums, the permutation of the (unstacked) kernel axes into
      ``(*in_axes, *out_axes)``; None when the kernel is already in that order.
    keep: why the layer cannot be factorised ("" when it can).
    order: position in the call (linen) or definition (NNX) order.
    call_shape: the shape of the layer's output in the traced call (linen), or None.
  """

  path: tuple[str, ...]
  kind: str
  stack: int
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  perm: tuple[int, ...] | None = None
  keep: str = ""
  order: int = -1
  call_shape: tuple[int, ...] | None = None

  @property
  def kernel_path(self) -> str:
    return "/".join((*self.path, "kernel"))

  @property
  def n(self) -> int:
    return math.prod(self.out_shape)


def canonical_kernel(kernel, layer: Layer):
  """The kernel as ``(*stack, *in_axes, prod(out_axes))``, the view `inherit` factorises."""
  if layer.perm is not None:
    axes = (*range(layer.stack), *(layer.stack + p for p in layer.perm))
    kernel = np.transpose(np.asarray(kernel), axes) if isinstance(kernel, np.ndarray) else kernel.transpose(axes)
  return kernel.reshape(*kernel.shape[: layer.stack], *layer.in_shape, layer.n)


def canonical_bias(bias, layer: Layer):
  return bias.reshape(*bias.shape[: layer.stack], layer.n)


@dataclasses.dataclass(frozen=True)
class Planned:
  """A factorised layer of the student: where, its rank and heads, and its matrix view.

  ``view`` is ``(in_shape, out_shape, perm)`` of the `Layer` it was inherited from (perm
  None when the identity): the student checks it against the layer as called (not part
  of equality: a student rebuilt without views is the same student, unchecked).
  """

  path: tuple[str, ...]
  rank: int
  heads: int
  view: tuple | None = dataclasses.field(default=None, compare=False)


def layer_view(in_shape, out_shape, perm) -> tuple:
  """``(in_shape, out_shape, perm)`` with an identity perm as None (comparable views)."""
  if perm is not None and tuple(perm) == tuple(range(len(perm))):
    perm = None
  return (tuple(int(d) for d in in_shape), tuple(int(d) for d in out_shape),
          None if perm is None else tuple(perm))


def inherit_layers(params: Mapping[str, Any], layers: list[Layer], spec, *,
                   output: tuple[str, ...] | None = None, keep_output: bool = True,
                   heads: int | None = None, key=None, calibration=None,
                   return_report: bool = False):
  """Inherits the kernels of ``layers`` in their canonical views; keeps the others.

  Args:
    params: the model's params (nested dict, the user's names).
    layers: the layers read from the model.
    spec: an `InherSpec`, an int rank or a float fraction (as `inherit`).
    output: path of the output layer, kept unless ``keep_output`` is False or a rule of
      the spec matches its kernel.
    keep_output: keep the output layer by default.
    heads: overrides the spec's heads.
    key, calibration: as `inherit` (Grams keyed by kernel path, in the canonical view).
    return_report: also return `inherit_report`'s rows (reasons of the default keeps
      included; ``shape`` the stored kernel's).

  Returns:
    ``(new_params, planned, rows)``: the inherited params (same container type, the
    user's names; kept kernels exactly as given), the factorised layers
    (`Planned`, in path order), and the report rows (None unless ``return_report``).
  """
  spec = as_spec(spec, heads)
  flat = traverse_util.flatten_dict(dict(params) if isinstance(params, FrozenDict) else params)
  by_path = {l.path: l for l in layers}
  canon, rules, reasons = dict(flat), [], {}
  for keys, value in flat.items():
    if keys[-1] != "kernel":
      continue
    path = "/".join(keys)
    layer = by_path.get(tuple(keys[:-1]))
    why = UNREAD_REASON if layer is None else layer.keep
    index, action = spec.match(path)
    if not why and keep_output and layer.path == output and index is None:
      why = OUTPUT_REASON
    if why:
      rules.append((re.escape(path), "skip"))
      reasons[path] = why
      continue
    rules.append((re.escape(path), {**action, "stack": layer.stack}))
    canon[keys] = canonical_kernel(value, layer)
    bias_keys = (*keys[:-1], "bias")
    if bias_keys in flat:
      canon[bias_keys] = canonical_bias(flat[bias_keys], layer)
  full = spec.replace(rules=tuple(rules) + spec.rules)
  result = inherit(traverse_util.unflatten_dict(canon), full, key=key, calibration=calibration,
                   return_report=return_report)
  out, rows = result if return_report else (result, None)
  planned = []
  for keys, value in traverse_util.flatten_dict(out).items():
    if keys[-2:] == ("down", "kernel"):  # A factorised layer: its rank and heads.
      up = out
      for k in (*keys[:-2], "up", "kernel"):
        up = up[k]
      l = by_path[tuple(keys[:-2])]
      planned.append(Planned(tuple(keys[:-2]), int(value.shape[-1]), int(up.shape[-3]),
                             layer_view(l.in_shape, l.out_shape, l.perm)))
  # Kept layers get their kernels back as given (not in the canonical view).
  out_flat = {k: flat.get(k, v) for k, v in traverse_util.flatten_dict(out).items()}
  new = traverse_util.unflatten_dict(out_flat)
  if isinstance(params, FrozenDict):
    new = FrozenDict(new)
  if rows is not None:
    for row in rows:
      if row["path"] in reasons:
        row["reason"] = reasons[row["path"]]
      layer = by_path.get(tuple(row["path"].split("/")[:-1]))
      row["layer"] = layer.kind if layer is not None else None
      row["shape"] = tuple(int(d) for d in flat[tuple(row["path"].split("/"))].shape)
  return new, tuple(sorted(planned, key=lambda p: p.path)), rows


def output_layer(layers: list[Layer], output_shapes) -> tuple[str, ...] | None:
  """The last layer (by ``order``) whose output shape is one of the model's outputs'."""
  shapes = {tuple(s) for s in output_shapes}
  best = None
  for l in layers:
    if l.call_shape in shapes and (best is None or l.order > best.order):
      best = l
  return None if best is None else best.path


def parse_einsum(equation: str, kernel_shape: tuple[int, ...]):
  """The matrix view of an einsum kernel, or why it has none.

  Returns:
    ``(in_letters, out_letters, lhs, result)`` with the kernel's input letters in kernel
    order and its output letters in result order, or a string: why the einsum is not
    one matrix product of its input (kernel axes shared by input and output, kernel
    axes summed alone, an ellipsis).
  """
  eq = equation.replace(" ", "")
  if "..." in eq or "->" not in eq or eq.count(",") != 1:
    return f"einsum {equation!r}: only explicit two-operand equations without '...' are factorised"
  operands, result = eq.split("->")
  lhs, rhs = operands.split(",")
  if len(rhs) != len(kernel_shape):
    return f"einsum {equation!r}: kernel of shape {kernel_shape} does not match"
  shared = [c for c in rhs if c in lhs and c in result]
  alone = [c for c in rhs if c not in lhs and c not in result]
  if shared or alone:
    return (f"einsum {equation!r}: kernel axes {shared + alone} are not inputs or outputs of "
            "one matrix product (per-head or summed kernel axes): kept")
  in_letters = "".join(c for c in rhs if c in lhs)
  out_letters = "".join(c for c in result if c in rhs)
  if not in_letters or not out_letters:
    return f"einsum {equation!r}: no input or no output axes: kept"
  return in_letters, out_letters, lhs, result
