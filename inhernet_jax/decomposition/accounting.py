"""Accounting: parameter counts, budgets, forward FLOPs, and the rank that meets a size.

Example:
  ```python
  target = models.param_count("resnet8x4", num_classes=100)       # a named student
  rank = rank_for_params(teacher_params, target, heads=3)          # InherNet at <= its size
  ```
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from inhernet_jax.decomposition.transform import planned_param_count
from inhernet_jax.decomposition.spec import InherSpec, as_spec


def param_count(params) -> int:
  """Number of scalars in a params pytree (arrays or `jax.ShapeDtypeStruct`s)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def budget_params(teacher_params, budget, *, where: str = "budget",
                  expected: str = "an int or a fraction in (0, 1]") -> int:
  """The parameter count a budget number stands for, for the whole inherited network.

  Args:
    teacher_params: the teacher's ``params`` (arrays or `jax.ShapeDtypeStruct`s).
    budget: an int (parameters, every leaf counted) or a float in (0, 1] (that fraction
      of the teacher's parameters, rounded down); strings holding either are read as
      such (command lines). Names such as ``"student:<zoo model>"`` are read by
      `sizes.parameter_budget`.
    where: what ``budget`` is, to start error messages.
    expected: what the caller reads, for error messages (`sizes` reads names too).

  Raises:
    TypeError: a budget of the wrong type, named with what was expected.
    ValueError: a budget out of range or not a number, and what was expected.
  """
  value = budget
  if isinstance(value, str):
    try:
      value = int(value.strip())
    except ValueError:
      try:
        value = float(value.strip())
      except ValueError:
        raise ValueError(f"{where} {budget!r}: expected {expected}") from None
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{where} must be {expected}, got {type(budget).__name__} {budget!r}")
  if isinstance(value, numbers.Integral):
    if value < 1:
      raise ValueError(f"{where} {budget!r}: a parameter count must be >= 1")
    return int(value)
  count = param_count(teacher_params)
  if not (math.isfinite(value) and 0.0 < value <= 1.0):
    raise ValueError(f"{where} {budget!r}: a float is a fraction of the teacher's {count:,} "
                     "parameters, in (0, 1]; give an int for a parameter count")
  return int(math.floor(value * count))


def forward_flops(apply_fn, *args, **kwargs) -> float:
  """FLOPs of one call ``apply_fn(*args, **kwargs)``, from XLA's cost analysis.

  Args may be arrays or `jax.ShapeDtypeStruct`s (nothing is executed). Counted on the
  CPU backend whatever the default one: XLA's GPU cost analysis leaves out
  convolutions (they become cuDNN custom calls), so a GPU count of a CNN is far too low.
  """
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a), sharding=cpu), args)
  compiled = jax.jit(lambda *a: apply_fn(*a, **kwargs)).lower(*args).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per device program.
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def rank_for_params(
    teacher_params,
    target_params: int,
    *,
    heads: int = 1,
    rules=(),
    rank_multiple: int = 1,
    variant: str = "gated",
) -> int:
  """Largest uniform rank whose inherited network has at most ``target_params``
  (a multiple of ``rank_multiple``, see `InherSpec.rank_multiple`).

  The count of an inherited network never decreases with the rank (a layer is kept dense
  once its factorisation stops saving parameters), so this is a binary search over
  `planned_param_count`, which plans without computing any SVD.

  Raises:
    ValueError: when even rank 1 exceeds the target (names both counts).
  """
  spec = InherSpec(rank=1, heads=heads, rules=tuple(rules), rank_multiple=rank_multiple,
                   variant=variant)
  # Searched in units of rank_multiple: the count is a step function of the rank.
  count = lambda u: planned_param_count(teacher_params, spec.replace(rank=u * rank_multiple))
  lo_count = count(1)
  if lo_count > target_params:
    raise ValueError(
        f"even rank {rank_multiple} with heads={heads} gives {lo_count} parameters, above "
        f"the target {target_params}; skip fewer layers or use fewer heads"
        + (" or a smaller rank_multiple" if rank_multiple > 1 else ""))
  shapes = [x.shape for x in jax.tree.leaves(teacher_params) if len(x.shape) >= 2]
  lo, hi = 1, max(1, max(min(int(np.prod(s[:-1])), s[-1]) for s in shapes) // rank_multiple)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if count(mid) <= target_params:
      lo = mid
    else:
      hi = mid - 1
  return lo * rank_multiple


def spec_for_params(teacher_params, target_params: int, *, heads: int = 1, rules=(),
                    rank_multiple: int = 1, variant: str = "gated") -> InherSpec:
  """`rank_for_params` as a ready `InherSpec`."""
  rank = rank_for_params(teacher_params, target_params, heads=heads, rules=rules,
                         rank_multiple=rank_multiple, variant=variant)
  return as_spec(InherSpec(rank=rank, heads=heads, rules=tuple(rules), rank_multiple=rank_multiple,
                           variant=variant))
