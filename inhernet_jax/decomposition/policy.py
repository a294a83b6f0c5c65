"""The rank policy: what happens to one kernel, and the exact counts it is decided by.

For a kernel at a path whose matrix is ``m x n`` (and, for the energy policy, its
singular values), `layer_plan` reads the `InherSpec` (its rank policy, or the matching
rule's) and returns a `LayerPlan`: keep the teacher layer, or factorise it at a rank
with some heads, data-aware or not. `stack_plan` does the same for every slice of a
scan-stacked kernel at once, and `method` picks each factorised kernel's SVD method.
The layers (`InherDense`, `InherConv`) call `layer_plan` with shapes only; the planning
pass (`plan.build`) calls it for every kernel of a teacher, so both agree.

The maths the policies are decided by live here too: a layer's exact parameter counts
(`dense_params`, `inherited_params`), and the ranks that meet an energy or a parameter
ratio (`rank_for_energy`, `rank_for_param_ratio`).

Example:
    ```python
    spec = InherSpec(rank=32, heads=3, rules=((r"head/kernel", "skip"),))
    layer_plan(spec, "block/conv/kernel", 3 * 3 * 64, 128, use_bias=False)
    # LayerPlan(factorize=True, rank=32, heads=3, full_rank=128, ...)
    ```
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from inhernet_jax.decomposition import svd
from inhernet_jax.decomposition.spec import POLICIES, InherSpec


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """What happens to one kernel.

  Attributes:
    factorize: False keeps the teacher layer unchanged.
    rank: the bottleneck rank ``r`` (0 when kept).
    heads: number of expert up-projections ``H``.
    full_rank: ``min(in, out)`` of the kernel matrix.
    reason: why a kernel is kept (empty when factorised).
    data_aware: truncate for the output error on calibration inputs (factorised only).
    variant: the layer's form (`spec.VARIANTS`: ``"gated"``, ``"no_gate"``,
      ``"symmetric"``).
  """

  factorize: bool
  rank: int
  heads: int
  full_rank: int
  reason: str = ""
  data_aware: bool = False
  variant: str = "gated"


def needs_values(spec: InherSpec, path: str) -> bool:
  """Whether ``path``'s plan depends on singular values (the energy policy)."""
  _, action = spec.match(path)
  if action.get("skip"):
    return False
  if any(p in action for p in POLICIES):
    return "energy" in action
  return spec.energy is not None


def layer_plan(spec: InherSpec, path: str, m: int, n: int, use_bias: bool,
               singular_values=None) -> LayerPlan:
  """The plan for a kernel at ``path`` whose matrix is ``m x n``.

  Args:
    spec: the request: a rank policy, heads and per-path rules.
    path: ``"/"``-joined param path of the kernel leaf.
    m: input features of the matrix (``prod(kernel.shape[:-1])`` less stack axes).
    n: output features.
    use_bias: whether the teacher layer has a bias.
    singular_values: the kernel's singular values, required by the energy policy.

  Raises:
    ValueError: no rank policy for ``path``, or the energy policy without singular
      values (both naming the path).
  """
  full = min(m, n)
  _, action = spec.match(path)
  heads = action.get("heads", spec.heads)
  if action.get("skip"):
    return LayerPlan(False, 0, heads, full, "skipped by rule")
  policy = next(((p, action[p]) for p in POLICIES if p in action), None)
  if policy is None:
    if spec.energy is not None:
      policy = ("energy", spec.energy)
    elif spec.param_ratio is not None:
      policy = ("param_ratio", spec.param_ratio)
    elif spec.rank is not None:
      policy = ("fraction" if isinstance(spec.rank, float) else "rank", spec.rank)
    else:
      raise ValueError(
          f"{path}: InherSpec has no rank policy (set rank, energy or param_ratio, "
          "or a rule action for this path)"
      )
  kind, value = policy
  multiple = spec.rank_multiple
  if kind == "rank":
    rank = value
  elif kind == "fraction":
    rank = max(1, math.ceil(value * full - 1e-9))
  elif kind == "energy":
    if singular_values is None:
      raise ValueError(
          f"{path}: the energy policy needs the teacher's singular values; resolve the "
          "spec first: spec = inhernet_jax.resolve(teacher_params, spec)"
      )
    rank = rank_for_energy(singular_values, value)
  else:
    rank = rank_for_param_ratio(m, n, value, heads, use_bias, spec.variant)
    rank -= rank % multiple  # Down: within the budget.
    if rank == 0:
      return LayerPlan(False, 0, heads, full, f"no rank meets param_ratio={value}"
                       + (f" at a multiple of {multiple}" if multiple > 1 else ""))
  if kind != "param_ratio":
    rank = min(-(-rank // multiple) * multiple, max(rank, full))
  aware = action.get("data_aware", spec.data_aware)
  variant = spec.variant
  if not spec.skip_if_no_saving:
    return LayerPlan(True, min(rank, full), heads, full, data_aware=aware, variant=variant)
  if rank >= full:
    return LayerPlan(False, 0, heads, full, f"rank {rank} >= full rank {full}")
  if inherited_params(m, n, rank, heads, use_bias, variant) >= dense_params(m, n, use_bias):
    return LayerPlan(False, 0, heads, full, "factorisation saves no parameters")
  return LayerPlan(True, rank, heads, full, data_aware=aware, variant=variant)


def stack_plan(spec: InherSpec, path: str, m: int, n: int, use_bias: bool,
               values=None) -> LayerPlan:
  """`layer_plan` of a kernel whose slices (a scan-stacked kernel's layers) share one
  plan. ``values``: the singular values of every slice (``(slices, k)``; the energy
  policy), else None. Every slice must meet the energy target: the stack gets the
  largest rank any slice needs, and is kept whole (with that slice's reason) when one
  slice must stay dense."""
  if values is None:
    return layer_plan(spec, path, m, n, use_bias)
  plans = [layer_plan(spec, path, m, n, use_bias, s) for s in values]
  kept = [i for i, p in enumerate(plans) if not p.factorize]
  if kept and len(plans) > 1:
    first = plans[kept[0]]
    return dataclasses.replace(first, reason=f"stack slice {kept[0]} must stay dense: {first.reason}")
  if kept:
    return plans[0]
  return max(plans, key=lambda p: p.rank)  # Every slice's plan passed the saving checks.


def method(spec: InherSpec, path: str, m: int, n: int, plan: LayerPlan) -> tuple[str, int]:
  """``(method, width)`` of a factorised kernel: ``"whitened"`` (data-aware), or the
  spec's SVD method with ``"auto"`` resolved (`svd.resolve_method`; a rank from an energy
  target is computed exactly, so the factors keep the energy planned); ``width`` is the
  randomized method's subspace columns (0 otherwise)."""
  if plan.data_aware:
    return "whitened", 0
  energy_target = needs_values(spec, path)
  return svd.method_and_width(m, n, plan.rank, spec.method, spec.oversample,
                              energy_target=energy_target)


# ----------------------------------------------------------------- counts and ranks
def dense_params(m: int, n: int, use_bias: bool = True) -> int:
  """Parameters of the teacher layer with an ``m x n`` matrix."""
  return m * n + (n if use_bias else 0)


def inherited_params(m: int, n: int, rank: int, heads: int = 1, use_bias: bool = True,
                     variant: str = "gated") -> int:
  """Exact parameters of the factorised layer.

  Shared down-projection ``m*r`` (no bias; ``heads * m*r`` for the ``"symmetric"``
  variant, one per head), ``heads`` up-projections ``r*n`` (+ ``n`` bias each), and for
  ``heads > 1`` a gate Dense ``r -> heads`` with bias (none for the ``"no_gate"``
  variant). With one head the gate would be a constant softmax over one logit, so there
  is none.
  """
  gate = rank * heads + heads if heads > 1 and variant != "no_gate" else 0
  downs = heads if variant == "symmetric" else 1
  return downs * m * rank + heads * (rank * n + (n if use_bias else 0)) + gate


def compression_ratio(m: int, n: int, rank: int, heads: int = 1, use_bias: bool = True,
                      variant: str = "gated") -> float:
  """Teacher parameters over inherited parameters of one layer (> 1 means smaller)."""
  return dense_params(m, n, use_bias) / inherited_params(m, n, rank, heads, use_bias, variant)


def rank_for_energy(s: Sequence[float] | np.ndarray, energy: float) -> int:
  """Smallest rank whose kept energy is at least ``energy`` (in (0, 1])."""
  s2 = np.square(np.asarray(s, np.float64))
  total = s2.sum()
  if total == 0:
    return 1
  cum = np.cumsum(s2) / total
  # A tolerance so that energy=1.0 is met despite rounding of the cumulative sum.
  return int(min(len(s2), np.searchsorted(cum, energy - 1e-12) + 1))


def rank_for_param_ratio(
    m: int, n: int, ratio: float, heads: int = 1, use_bias: bool = True,
    variant: str = "gated",
) -> int:
  """Largest rank whose layer has at most ``ratio`` times the teacher's parameters.

  Returns 0 when even rank 1 exceeds the budget.
  """
  budget = ratio * dense_params(m, n, use_bias)
  fixed = heads * (n if use_bias else 0)
  gated = heads > 1 and variant != "no_gate"
  downs = heads if variant == "symmetric" else 1
  per_rank = downs * m + heads * n + (heads if gated else 0)
  extra = heads if gated else 0  # gate bias
  r = math.floor((budget - fixed - extra) / per_rank)
  return int(max(0, min(r, min(m, n))))
