"""Serving: fold what can be folded in an inherited network's parameters.

A factorised layer with one head (``H = 1``) computes ``x -> (x @ down) @ up_0 + b_0``:
no gate, so it is the plain layer with kernel ``down @ up_0`` (a conv's ``(*k, in / G,
r)`` down kernel times the ``(r, out)`` 1x1 up kernel is the teacher-shaped ``(*k, in /
G, out)`` kernel, grouped convs included). `fold` multiplies the factors out where the
single kernel is cheaper to run, and returns a spec (or model) that keeps those layers
unfactorised, so the served network runs one conv/GEMM per such layer instead of two.

Which is cheaper, per output position (conv) or token (dense), for the ``m x n`` kernel
matrix (``m = prod(k) in / G``, ``n = out``) at rank ``r``: factorised ``r (m + n)``
multiply-adds (``r (G m + n)`` for a grouped conv: the shared down projection runs on
every group), folded ``m n``. `fold` folds when ``m n <= r (m + n)``, which never
overestimates the saving (``G`` is not in the parameters; ``G > 1`` only makes the
factorised layer dearer). At the usual ranks (1/4 of full rank) the factorised layer is
about twice cheaper and stays; near full rank the folded one wins. ``policy="always"``
folds every one-head layer (one kernel instead of two launches, for latency-bound serving).

Gated layers (``H > 1``) are left as they are: their kernel depends on the input. BatchNorm
is not folded: the zoo's models apply it as a separate module after bias-free convs, so a
folded BatchNorm needs a model variant without it; XLA already fuses the eval-mode
BatchNorm affine into the conv's consumer fusion.

Example:
  ```python
  spec = InherSpec(rank=1.0, heads=1, skip_if_no_saving=False)
  student = teacher.clone(spec=spec)
  variables = {**teacher_vars, "params": inherit(teacher_vars["params"], spec)}
  served_vars, served = fold(variables, student)       # served: a model, same logits
  logits = served.apply(served_vars, x, train=False)
  ```
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from inhernet_jax.decomposition.policy import layer_plan
from inhernet_jax.decomposition.spec import InherSpec

POLICIES = ("flops", "always")


def saves_flops(m: int, n: int, rank: int) -> bool:
  """Whether one ``m x n`` kernel costs at most the factorised ``r (m + n)`` per position."""
  return m * n <= rank * (m + n)


def _is_factorised(node: Any) -> bool:
  """An `InherDense` / `InherConv` factorisation: ``down`` and ``up`` with kernel leaves
  (a teacher's own submodules named so hold modules, not kernels)."""
  return isinstance(node, Mapping) and all(
      isinstance(node.get(k), Mapping) and hasattr(node[k].get("kernel"), "shape")
      for k in ("down", "up"))


def _fold_layer(node: Mapping, path: str, spec: InherSpec, policy: str):
  """``(teacher-layout params, folded?)`` of one factorised layer ``node`` at ``path``."""
  down, up = node["down"]["kernel"], node["up"]["kernel"]
  stack = up.ndim - 3
  if stack < 0 or down.ndim < stack + 2 or down.shape[:stack] != up.shape[:stack] \
      or down.shape[-1] != up.shape[-2]:
    raise ValueError(
        f"{path}: down/kernel {tuple(down.shape)} and up/kernel {tuple(up.shape)} do not "
        "compose: expected up (*stack, H, r, out) and down (*stack, ..., r)")
  heads, rank, n = up.shape[stack:]
  m = math.prod(down.shape[stack:-1])
  bias = node["up"].get("bias")
  if bias is not None and tuple(bias.shape) != (*up.shape[:stack], heads, n):
    raise ValueError(f"{path}: up/bias {tuple(bias.shape)}, expected {(*up.shape[:stack], heads, n)}")
  if (heads == 1) == ("gate" in node):
    raise ValueError(f"{path}: {heads} head(s) {'with' if heads == 1 else 'without'} a gate")
  plan = layer_plan(spec, f"{path}/kernel", m, n, bias is not None)
  if not plan.factorize or (plan.rank, plan.heads) != (rank, heads):
    raise ValueError(
        f"{path}: the params (rank {rank}, {heads} head(s)) do not match the spec's plan "
        f"({plan.reason or f'rank {plan.rank}, {plan.heads} head(s)'}); pass the spec they "
        "were inherited with")
  if heads > 1 or (policy == "flops" and not saves_flops(m, n, rank)):
    return node, False
  lead = down.shape[:stack]
  d = down.reshape(*lead, m, rank)
  kernel = jnp.einsum("...mr,...rn->...mn", d, up[..., 0, :, :], precision="highest")
  out = {"kernel": kernel.reshape(*down.shape[:-1], n).astype(down.dtype)}
  if bias is not None:
    out["bias"] = bias[..., 0, :]
  return out, True


def fold(variables: Mapping[str, Any], spec_or_model, *, policy: str = "flops"):
  """Folds the one-head factorised layers of an inherited network for inference.

  A pure function: nothing passed in is mutated.

  Example:
    ```python
    served_vars, served_model = fold(variables, student)     # student: model.clone(spec=s)
    served_model.apply(served_vars, x, train=False)          # the student's logits
    params, spec = fold(variables["params"], s)              # with a spec: a spec back
    ```

  Args:
    variables: the inherited network's variables (``{"params": ..., "batch_stats":
      ...}``) or its ``params`` collection alone.
    spec_or_model: the `InherSpec` the params were inherited with, or the inherited
      model (a Flax module with a ``spec`` field).
    policy: ``"flops"`` folds a layer when one kernel costs no more FLOPs than its two
      factors (``m n <= r (m + n)``, see the module docstring); ``"always"`` folds every
      one-head layer.

  Returns:
    ``(variables, spec_or_model)`` of the same kinds as given: the folded layers have the
    teacher's layout (``kernel`` ``down @ up_0``, ``bias`` ``b_0``) and the returned spec
    (or ``model.clone(spec=...)``) keeps them unfactorised; everything else is unchanged.
    ``(x @ down) @ up`` and ``x @ (down @ up)`` round differently: expect about 1e-6
    relative differences in float32.

  Raises:
    TypeError: ``variables`` is not a mapping or ``spec_or_model`` neither a spec nor a
      model with one.
    ValueError: a factorised layer (named by its path) whose factors do not compose or do
      not match the spec's plan, or an unknown ``policy``.
  """
  if policy not in POLICIES:
    raise ValueError(f"fold: policy must be one of {POLICIES}, got {policy!r}")
  if not isinstance(variables, Mapping):
    raise TypeError(f"fold: variables must be a mapping (variables or params), got "
                    f"{type(variables).__name__}")
  if isinstance(spec_or_model, InherSpec) or spec_or_model is None:
    spec, model = spec_or_model, None
  elif isinstance(getattr(spec_or_model, "spec", False), (InherSpec, type(None))):
    spec, model = spec_or_model.spec, spec_or_model
  else:
    raise TypeError(f"fold: expected an InherSpec or a model with a spec field, got "
                    f"{type(spec_or_model).__name__}")
  whole = "params" in variables and isinstance(variables["params"], Mapping)
  params = variables["params"] if whole else variables
  folded_paths = []

  def visit(node, path):
    if _is_factorised(node):
      if spec is None:
        raise ValueError(f"{path}: a factorised layer, but the model has no spec")
      new, folded = _fold_layer(node, path, spec, policy)
      if folded:
        folded_paths.append(path)
      return dict(new) if isinstance(new, Mapping) else new
    if isinstance(node, Mapping):
      return {k: visit(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}
    return node

  new_params = visit(params, "")
  if folded_paths:
    keep = tuple((re.escape(f"{p}/kernel"), "skip") for p in folded_paths)
    spec = spec.replace(rules=keep + spec.rules)
  out_vars = {**variables, "params": new_params} if whole else new_params
  if model is not None:
    return out_vars, (model.clone(spec=spec) if folded_paths else model)
  return out_vars, spec
