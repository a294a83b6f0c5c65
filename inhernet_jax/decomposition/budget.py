"""Budget-matched per-layer ranks: the inherited network that keeps the most energy.

A budget is a number: a parameter count, or a fraction of the teacher's
(`accounting.budget_params`; names such as "as large as zoo model X",
``"student:<zoo model>"``, are read a layer up, by `sizes.parameter_budget`). `allocate`
picks one rank per inherited kernel so that the whole inherited network has at most that
many parameters (heads, gates, biases and every untouched leaf counted exactly, as
`inherit.planned_param_count` counts them) and keeps as much normalised spectral energy
as it can:

```text
maximise  sum over kernel matrices of  sum_{i<=r} s_i^2 / sum_i s_i^2
s.t.      parameters(inherited network) <= budget
```

A scan-stacked kernel has one rank for its whole stack and each of its layers counts as
one matrix. A layer may also stay dense (all its energy, its teacher size). `uniform` is
the baseline, one rank everywhere (`accounting.rank_for_params`). Both return an
`InherSpec` with exact per-path rules, like `inherit.resolve`, so that
``model.clone(spec=spec)`` and ``inherit(params, spec)`` agree.

The objectives (``objective=``) differ in which layers get rank. The plain sum
(``"energy"``) rewards energy still missing, so a layer with a flat spectrum (every
direction matters as much) gets more rank, or stays dense, than one whose spectrum decays
fast; and it will trade one layer's last few percent for another's larger share, so at
tight budgets it can starve a costly layer (rank 1). ``"log_energy"`` (the product of the
fractions) does not starve a layer. Both count a costly layer's fraction as much as a
cheap one's, so they buy rank where it is cheap (narrow outputs, few heads) and leave the
wide layers a narrow bottleneck, which fine-tuning cannot widen. ``"param_energy"`` (the
default of `allocate`, the launchers and the configs) weights each matrix's fraction by
its dense size (about its share of the teacher's weight energy) and keeps every layer at
least half the uniform rank (``rank_floor``), so that no cheap layer is starved in turn.
Per-layer ranks still do not beat uniform ranks after fine-tuning in our measurements
(docs/api.md, "Budget allocation: measured"): uniform ranks are the safer choice when
the network is fine-tuned afterwards.

The greedy (see `allocate`) is a heuristic with no guaranteed bound (how far it is from
the optimum: ``python -m benchmarks.budget``); ``method="exact"`` solves small problems
exactly.

Example:
  ```python
  target = sizes.parameter_budget(teacher_params, "student:resnet8x4", num_classes=100)
  rules = models.preset("default", "resnet32x4")
  spec = allocate(teacher_params, target, heads=3, rules=rules)
  student = teacher.clone(spec=spec)              # its params: inherit(teacher_params, spec)
  print(summary(teacher_params, spec)["energy_mean"])
  ```
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from inhernet_jax.decomposition import accounting
from inhernet_jax.decomposition import plan as plan_lib
from inhernet_jax.decomposition import policy
from inhernet_jax.decomposition import svd
from inhernet_jax.decomposition.budget_solve import _cost, _Layer, _objective, solve
from inhernet_jax.decomposition.spec import POLICIES, InherSpec, as_spec
from inhernet_jax.decomposition.transform import planned_param_count

METHODS = ("greedy", "exact")
OBJECTIVES = ("energy", "log_energy", "param_energy")


# ---------------------------------------------------------------------------- budget
def _target(teacher_params, budget) -> int:
  """`accounting.budget_params` (names of zoo models are read a layer up, by
  `sizes.parameter_budget`)."""
  return accounting.budget_params(teacher_params, budget)



# --------------------------------------------------------------------------- layers
def _layer_costs(k, heads: int, variant: str = "gated") -> tuple[int, int, int, int]:
  """``(rank-1 cost, cost per extra rank, dense cost, max_rank)`` of a kernel's stack;
  ``max_rank`` is the largest rank whose factorisation has fewer parameters than the
  dense layer (0: none has)."""
  layers = int(np.prod(k.stack_shape))
  use_bias = k.bias is not None
  base = policy.inherited_params(k.m, k.n, 1, heads, use_bias, variant)
  step = policy.inherited_params(k.m, k.n, 2, heads, use_bias, variant) - base  # Linear in r.
  dense = policy.dense_params(k.m, k.n, use_bias)
  max_rank = 0 if base >= dense else min(min(k.m, k.n) - 1, (dense - 1 - base) // step + 1)
  return layers * base, layers * step, layers * dense, max_rank


def _normalised_energy(sv: np.ndarray) -> np.ndarray:
  """``s_i^2 / sum_j s_j^2`` per slice (0 for an all-zero slice), float64."""
  s = np.abs(np.asarray(sv, np.float64))
  s = s / np.maximum(s.max(-1, keepdims=True), np.finfo(np.float64).tiny)  # No overflow.
  s2 = np.square(s)
  total = s2.sum(-1, keepdims=True)
  return np.where(total > 0, s2 / np.where(total > 0, total, 1), 0.0)


def _spectra(kernels, spectra: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
  """Singular values ``(layers, full)`` of each kernel: from ``spectra`` where given
  (validated, zero-padded to full length), else from the weights, batched by shape on the
  host like `plan.spectra`."""
  out, todo = {}, []
  spectra = dict(spectra or {})
  for k in kernels:
    if k.path not in spectra:
      todo.append(k)
      continue
    s = np.asarray(spectra[k.path], np.float64)
    full, stack = min(k.m, k.n), tuple(k.stack_shape)
    if s.ndim < 1 or s.shape[:-1] != stack or not 1 <= s.shape[-1] <= full:
      raise ValueError(f"spectra[{k.path!r}]: expected shape (*{stack}, k) with 1 <= k <= "
                       f"{full} (the kernel's stack axes, then its singular values), got {s.shape}")
    if not np.isfinite(s).all() or (s < 0).any():
      raise ValueError(f"spectra[{k.path!r}]: singular values must be finite and >= 0")
    if (np.diff(s, axis=-1) > 1e-6 * s[..., :1]).any():
      raise ValueError(f"spectra[{k.path!r}]: singular values must be in descending order")
    pad = np.zeros((*stack, full - s.shape[-1]))
    out[k.path] = np.concatenate([s, pad], -1).reshape(-1, full)
  for group in plan_lib.by_shape(todo).values():
    mats = np.concatenate([np.asarray(k.matrices()) for k in group])
    sv = np.asarray(svd.singular_values(mats, xp=np), np.float64)
    offset = 0
    for k in group:
      count = int(np.prod(k.stack_shape))
      out[k.path], offset = sv[offset: offset + count], offset + count
  return out


def _problem(teacher_params, spec: InherSpec, spectra, objective: str = "energy"):
  """Kernels, the free layers, and the parameters of everything else.

  A kernel is free when no rule fixes its plan (skip, or a rank policy of its own) and
  some rank saves parameters; every other kernel is planned by the spec as `inherit`
  would, and counts at its planned size. A free layer's values are its slices' kept
  energies (or their logs, ``objective="log_energy"``; weighted by the matrix's dense
  size over the mean of the free matrices', ``"param_energy"``), summed.
  """
  if spectra is not None and not isinstance(spectra, Mapping):
    raise TypeError(f"spectra must be a dict of kernel path -> singular values, got "
                    f"{type(spectra).__name__}")
  kernels = plan_lib.collect(teacher_params, spec)
  known = {k.path for k in kernels}
  unknown = sorted(set(spectra or {}) - known)
  if unknown:
    raise ValueError(f"spectra names {unknown}, not kernels of the teacher; "
                     f"kernels: {sorted(known)}")
  free, fixed = [], []
  for k in kernels:
    action = spec.match(k.path)[1]
    heads = action.get("heads", spec.heads)
    if k.plan is None and not any(p in action for p in POLICIES):
      base, step, dense, max_rank = _layer_costs(k, heads, spec.variant)
      if max_rank >= 1:
        free.append((k, heads, base, step, dense, max_rank))
        continue
      k = dataclasses.replace(k, plan=policy.LayerPlan(False, 0, heads, min(k.m, k.n),
                                                       "no rank saves parameters"))
    fixed.append(k)
  fixed = plan_lib.plan_kernels(fixed, spec)
  planned = {k.path: k for k in fixed}
  kernels = [planned.get(k.path, k) for k in kernels]
  other = accounting.param_count(teacher_params)
  for k in fixed:
    before, after = k.param_counts()
    other += after - before
  spectra = _spectra([f[0] for f in free], spectra)
  layers = []
  for k, heads, base, step, dense, max_rank in free:
    other -= dense
    energy = _normalised_energy(spectra[k.path])  # (slices, full)
    kept = np.cumsum(energy, -1)
    if objective == "log_energy":  # Concave in the rank too; an all-zero slice keeps 1.
      kept = np.where(energy.sum(-1, keepdims=True) > 0, np.log(np.maximum(kept, 1e-300)), 0.0)
    costs = np.append(base + step * np.arange(max_rank, dtype=np.int64), dense)
    values = np.append(kept[:, :max_rank].sum(0), kept[:, -1].sum())
    layers.append(_Layer(k, heads, costs, values))
  if objective == "param_energy" and layers:
    # Each matrix's fraction weighted by its dense size (mean weight 1 over the matrices).
    sizes = np.array([l.costs[-1] / int(np.prod(l.kernel.stack_shape)) for l in layers], np.float64)
    counts = np.array([int(np.prod(l.kernel.stack_shape)) for l in layers], np.float64)
    mean = (sizes * counts).sum() / counts.sum()
    for l, size in zip(layers, sizes):
      l.values = l.values * (size / mean)
  return kernels, layers, other



def _base_spec(spec, heads, rules, uniform: bool = False) -> InherSpec:
  base = InherSpec() if spec is None else spec
  if not isinstance(base, InherSpec):
    raise TypeError(f"spec must be an InherSpec or None, got {type(spec).__name__}")
  if base.rank_multiple != 1 and not uniform:
    # Its options are ranks 1, 2, ...: a multiple would be rounded after the choice,
    # over the budget. Say so rather than return a spec that breaks it.
    raise ValueError(
        f"budget: InherSpec.rank_multiple={base.rank_multiple} is not supported by the "
        "budget allocation (its per-layer options are single rank steps); use uniform "
        "ranks (budget.uniform, accounting.rank_for_params) or rank_multiple=1")
  return as_spec(base, heads, tuple(rules))


def _exact_rules(spec: InherSpec, kernels, chosen: dict[str, int], heads: dict[str, int]) -> tuple:
  """``(re.escape(path), action)`` for every kernel, as `inherit.resolve` writes them.

  A factorised kernel's action keeps the other keys of the rule that matched it (say
  ``data_aware``): the exact rule is matched first and hides that rule.
  """
  rules = []
  for k in kernels:
    rank = chosen[k.path] if k.path in chosen else (k.plan.rank if k.plan.factorize else 0)
    if rank:
      drop = (*POLICIES, "skip", "heads", "stack")
      action = {key: v for key, v in spec.match(k.path)[1].items() if key not in drop}
      action.update(stack=k.stack, rank=rank,
                    heads=heads[k.path] if k.path in heads else k.plan.heads)
    else:
      action = {"stack": k.stack, "skip": True}
    rules.append((re.escape(k.path), action))
  return tuple(rules)


def allocate(
    teacher_params,
    budget,
    *,
    heads: int | None = None,
    rules=(),
    spec: InherSpec | None = None,
    spectra: Mapping[str, Any] | None = None,
    method: str = "greedy",
    objective: str = "param_energy",
    return_info: bool = False,
    max_moves: int | None = None,
    rank_floor: float | None = None,
):
  """Per-layer ranks with the most kept energy within a parameter budget.

  Every kernel not fixed by a rule starts at rank 1; ranks (or dense) are then added
  where they keep the most normalised energy per parameter. A rank past the largest
  that saves parameters makes the layer dense instead (all its energy, teacher size).

  ``method="greedy"``: every layer's increments, most energy per parameter first, taken
  while they fit (vectorised: a prefix per pass, a pass or two per layer). A layer's
  increments follow the upper concave hull of its options: rank steps, and the jump to
  dense as one all-or-nothing increment where it is worth more per parameter than the
  last ranks (flat spectra); a jump that does not fit falls back to its rank steps.
  Dense jumps make this a knapsack, so there are more starts: the greedy with one layer
  forced dense (the best few jumps) and the uniform allocation. The best few starts
  are improved by a local search (single steps up; one layer down and another up, while
  the objective rises) and the best wins: never worse than uniform. No bound is
  guaranteed (its gap to ``"exact"`` on random problems: `benchmarks.budget`).
  ``"exact"``: the optimum by dynamic programming (small models; raises when too large).

  Args:
    teacher_params: the teacher's ``params`` collection (concrete arrays).
    budget: total parameters of the inherited network, every leaf counted; an int or a
      fraction of the teacher (`accounting.budget_params`); a name
      (``"student:<zoo model>"``) is read first by `sizes.parameter_budget`.
    heads: expert up-projections per layer; default the spec's heads (1 without spec).
      A rule's own ``heads`` wins for its paths.
    rules: ``(regex, action)`` rules selecting the inherited kernels (e.g.
      `models.preset`), tried before the spec's. Kernels a rule skips count at their
      dense size; kernels a rule gives a rank policy keep it and count at that size.
    spec: a base `InherSpec`; all its fields but the rank policy are kept (``method``...).
    spectra: kernel path -> singular values ``(*stack, k)`` (descending, ``k`` at most
      the full rank; missing values count as zero) used instead of the weights' own,
      e.g. data-aware output energies. Kernels not named use their weights'.
    method: ``"greedy"`` or ``"exact"``.
    objective: ``"energy"``: the sum of kept energies (above); ``"log_energy"``: the sum
      of their logs (their product), which will not leave one layer with almost
      nothing to give another a little more.
      ``"param_energy"`` (default): the sum of kept energies weighted by each matrix's
      dense size (mean weight 1), above a rank floor (``rank_floor`` 0.5 by default).
    return_info: also return a dict: ``params`` (exactly what `inherit` will produce),
      ``budget``, ``objective`` (its value, over the free matrices), ``ranks``
      (path -> rank, 0 for dense) of the free kernels, ``method``.
    max_moves: most local-search moves (default ``10 * layers + 100``).
    rank_floor: a fraction in [0, 1] of the largest uniform rank within the budget, ``u``:
      every free layer keeps rank ``max(1, floor(rank_floor * u))`` at least (or dense).
      Default: 0.5 for ``"param_energy"``, 0 (rank 1) otherwise; 1.0 is uniform, with
      only the leftover parameters allocated.

  Returns:
    An `InherSpec` with one exact rule per kernel (and the info dict when asked).

  Raises:
    ValueError: an infeasible budget (names the count at rank 1 and the budget), an
      unknown method, bad spectra (names the path).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
  if rank_floor is not None and not (isinstance(rank_floor, numbers.Real)
                                     and 0.0 <= rank_floor <= 1.0):
    raise ValueError(f"rank_floor must be a fraction in [0, 1] of the uniform rank, "
                     f"got {rank_floor!r}")
  target = _target(teacher_params, budget)
  base = _base_spec(spec, heads, rules)
  kernels, layers, other = _problem(teacher_params, base, spectra, objective)
  remaining = target - other
  floor = int(sum(int(l.costs[0]) for l in layers))
  if floor > remaining:
    raise ValueError(
        f"budget {target:,} parameters is infeasible: rank 1 on every inherited layer "
        f"(heads={base.heads}) already gives {other + floor:,} parameters; skip fewer "
        "layers, use fewer heads or a larger budget")
  if rank_floor is None:
    rank_floor = 0.5 if objective == "param_energy" else 0.0
  level = solve(layers, remaining, method=method, rank_floor=rank_floor, max_moves=max_moves)
  # Options to ranks: 0 is dense.
  chosen = {l.kernel.path: 0 if j == l.dense_option else int(j) + 1 for l, j in zip(layers, level)}
  layer_heads = {l.kernel.path: l.heads for l in layers}
  out = base.replace(rules=_exact_rules(base, kernels, chosen, layer_heads) + base.rules,
                     rank=None, energy=None, param_ratio=None)
  if not return_info:
    return out
  info = {"params": other + _cost(layers, level), "budget": target, "method": method,
          "objective": _objective(layers, level), "ranks": chosen}
  return out, info


def uniform(teacher_params, budget, *, heads: int | None = None, rules=(),
            spec: InherSpec | None = None) -> InherSpec:
  """The largest uniform rank within ``budget`` (`accounting.rank_for_params`).

  Same arguments as `allocate`; the spec keeps the base spec's other fields and carries
  the rank as its policy (no per-path rules are added).
  """
  target = _target(teacher_params, budget)
  base = _base_spec(spec, heads, rules, uniform=True)
  rank = accounting.rank_for_params(teacher_params, target, heads=base.heads, rules=base.rules,
                                    rank_multiple=base.rank_multiple)
  return base.replace(rank=rank, energy=None, param_ratio=None)


# --------------------------------------------------------------------------- summary
def summary(teacher_params, spec: InherSpec, spectra: Mapping[str, Any] | None = None) -> dict:
  """What ``inherit(teacher_params, spec)`` keeps, for reports and benchmarks.

  Returns:
    ``params`` (of the inherited network), ``teacher_params``, ``energy_mean`` (kept
    normalised energy averaged over every kernel matrix, stacks counted per layer, dense
    ones at 1), ``energy_weighted`` (the same weighted by each matrix's teacher
    parameters), ``energy_sum``, and ``layers``: one row per kernel with ``path``,
    ``rank`` (0: dense), ``heads``, ``stack``, ``energy`` (mean over its stack),
    ``params`` and ``dense_params``.
  """
  kernels = plan_lib.plan_kernels(plan_lib.collect(teacher_params, spec), spec)
  unknown = sorted(set(spectra or {}) - {k.path for k in kernels})
  if unknown:
    raise ValueError(f"spectra names {unknown}, not kernels of the teacher")
  factorised = [k for k in kernels if k.plan.factorize]
  values = _spectra(factorised, {p: s for p, s in (spectra or {}).items()
                                 if p in {k.path for k in factorised}})
  rows, energies, weights = [], [], []
  for k in kernels:
    layers = k.layers
    dense_all, params = k.param_counts()
    dense = dense_all // layers
    kept = np.ones(layers)
    if k.plan.factorize:
      s2 = _normalised_energy(values[k.path])
      nonzero = s2.sum(-1) > 0
      kept = np.where(nonzero, s2[:, :k.plan.rank].sum(-1), 1.0)
    energies.append(kept)
    weights.append(np.full(layers, dense))
    rows.append({"path": k.path, "rank": k.plan.rank if k.plan.factorize else 0,
                 "heads": k.plan.heads if k.plan.factorize else 0, "stack": k.stack,
                 "energy": float(kept.mean()), "params": params, "dense_params": dense_all})
  energies = np.concatenate(energies or [np.ones(0)])
  weights = np.concatenate(weights or [np.ones(0)])
  return {
      "params": planned_param_count(teacher_params, spec),
      "teacher_params": accounting.param_count(teacher_params),
      "energy_mean": float(energies.mean()) if energies.size else 1.0,
      "energy_weighted": (float((energies * weights).sum() / weights.sum())
                          if energies.size else 1.0),
      "energy_sum": float(energies.sum()),
      "layers": rows,
  }
