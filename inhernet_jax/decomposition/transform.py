"""The pytree transform: a teacher's params in, the inherited network's params out.

`inherit` walks a Flax ``params`` collection and builds one decomposition plan
(`plan.build`: per kernel, by the rank policy, whether to keep or factorise it, and
batches of kernels with the same matrix shape, rank and method). An executor runs the
plan: `host.run` (NumPy, concrete kernels in host memory), `compute.run` (one jitted
program per batch: accelerators, or inside a jit) or, for teachers sharded over a
mesh, `sharded.decompose` (factors born sharded). All run the same per-batch
computation from the same start matrices, so every path gives the same factors up to
float rounding. `assemble.rebuild` then makes a new pytree in the layout of
`InherDense` / `InherConv`; nothing else changes: biases of kept layers, norms,
embeddings and every other leaf pass through as the same objects.

The SVD is set by the spec: ``method="auto"`` (default: the randomized method of
`svd.randomized_svd` for large kernels at ranks up to a quarter of full, within 1% of
the optimal error on every spectrum; exact SVDs for small kernels, higher ranks, energy
targets and steep spectra), ``"exact"`` (optimal,
slowest) or ``"randomized"``; ``power_iters`` / ``oversample`` trade accuracy for
speed (``power_iters=2`` is the documented faster setting).

Data-aware inheritance (``InherSpec(data_aware=True)`` or a ``{"data_aware": True}``
rule): each such kernel is truncated for its output error on calibration inputs
(`svd.whitened_svd`, exact SVDs), from the per-kernel input Grams of
`inhernet_jax.calibration.grams.input_grams` passed as ``calibration=``. Each Gram is divided by
its row count first, so the factors do not depend on how many batches were collected.

Example:
    ```python
    student_params = inherit(teacher_params, 32, heads=3)
    spec = resolve(teacher_params, InherSpec(energy=0.9, heads=3))   # data-dependent ranks
    model = Model(spec=spec)                                          # matches the tree
    rows = inherit_report(teacher_params, spec)                       # one row per kernel
    # Data-aware: truncate for the output error on calibration inputs.
    grams = calibration.input_grams(teacher, variables, batches, apply_kwargs={"train": False})
    student_params = inherit(teacher_params, spec.replace(data_aware=True), calibration=grams)
    # A teacher sharded over a mesh: factors born sharded, by the tensor-parallel rules.
    student_params = inherit(sharded_teacher, spec, sharding_rules="tensor_parallel")
    ```
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from inhernet_jax.decomposition import assemble
from inhernet_jax.decomposition import compute
from inhernet_jax.decomposition import host
from inhernet_jax.decomposition import plan as plan_lib
from inhernet_jax.decomposition import sharded
from inhernet_jax.decomposition.plan import Kernel, Plan
from inhernet_jax.decomposition.spec import InherSpec, as_spec
from inhernet_jax.parallel import sharding as sharding_lib


def _report(plan: Plan, outs: Mapping[str, assemble.Inherited]) -> list[dict]:
  return [_report_row(k, outs.get(k.path), plan.spec.damping) for k in plan.kernels]


def _report_row(k: Kernel, result: assemble.Inherited | None, damping: float) -> dict:
  before, after = k.param_counts()
  row = {
      "path": k.path,
      "shape": tuple(int(d) for d in k.kernel.shape),
      "stack": k.stack,
      "action": "factorize" if k.plan.factorize else "keep",
      "reason": k.plan.reason,
      "rank": k.plan.rank,
      "heads": k.plan.heads if k.plan.factorize else 0,
      "full_rank": min(k.m, k.n),
      "energy": 1.0,
      "error": 0.0,
      "rel_error": 0.0,
      "params_before": before,
      "params_after": after,
      "data_aware": False,
      "output_rel_error": 0.0,
  }
  if k.plan.factorize:
    # On the host in float64: reports are for reading, and the error of the factors we
    # actually produced (not a formula) is what a user wants to see.
    a = np.asarray(k.matrices(), np.float64)
    u, s, v = (np.asarray(f, np.float64) for f in result.factors)
    diff = a - (u * s[:, None, :]) @ np.swapaxes(v, -1, -2)
    norms = np.square(a).sum((-2, -1))
    total = float(norms.sum())
    row["energy"] = float(np.square(s).sum()) / total if total > 0 else 1.0
    row["error"] = float(np.linalg.norm(diff))
    row["rel_error"] = row["error"] / np.sqrt(total) if total > 0 else 0.0
    row["output_rel_error"] = None
    if k.gram is not None:  # ||X (A - A_r)|| / ||X A|| on the calibration inputs.
      count = np.asarray(k.gram[1], np.float64)[..., None, None]  # Per row, as `_whitened`.
      g = (np.asarray(k.gram[0], np.float64) / count).reshape(-1, k.m, k.m)
      out = _trace_form(a, g).sum()
      row["output_rel_error"] = float(np.sqrt(_trace_form(diff, g).sum() / out)) if out > 0 else 0.0
    if result.whitened is not None:
      # s are singular values of L^T A (or of A where whitening failed): the energy kept
      # is the share of the damped Gram's output energy ||L^T A||^2.
      g = g + damping * np.mean(np.diagonal(g, axis1=-2, axis2=-1), -1)[:, None, None] * np.eye(k.m)
      energy = float(np.where(result.whitened, _trace_form(a, g), norms).sum())
      row["energy"] = float(np.square(s).sum()) / energy if energy > 0 else 1.0
      row["data_aware"] = bool(result.whitened.all())
      if not row["data_aware"]:
        failed = np.flatnonzero(~result.whitened).tolist()
        row["reason"] = f"data-aware: Gram not positive definite, plain SVD for slices {failed}"
  return row


def _trace_form(x, g):
  """``tr(x^T g x)`` per slice: ``||X x||_F^2`` for inputs with Gram ``g = X^T X``."""
  return np.einsum("bij,bij->b", x, g @ x)


def _plan(params, rank, heads, rules, key=None, *, execute=True, mesh=None,
          sharding_rules=None, calibration=None) -> tuple[Plan, Mesh | None, Any]:
  """The plan (`plan.collect`, placed on the mesh when the sharded executor will run
  it, `plan.build`), the mesh (None: a local executor) and the sharding rules."""
  spec = as_spec(rank, heads, rules)
  kernels = plan_lib.collect(params, spec, abstract=not execute)  # Plans need shapes only.
  mesh = sharded.sharded_mesh(kernels, mesh)
  values = None
  if mesh is not None:
    sharding_rules = sharding_lib.resolve_rules(sharding_rules)
    kernels = sharded.place_all(kernels, mesh, sharding_rules)
    values = lambda k: sharded.singular_values(k, mesh)  # noqa: E731
  built = plan_lib.build(kernels, spec, key=key, calibration=calibration, singular_values=values,
                         grams=execute)
  return built, mesh, sharding_rules


def _execute(plan: Plan, mesh, sharding_rules, keep_factors=True) -> dict:
  """Runs ``plan`` on its executor: ``{path: assemble.Inherited}``. NumPy when every
  factorised kernel is a concrete array in host memory (`host.run`: on the CPU,
  compiling one XLA program per shape costs more than the work itself), the mesh's
  when sharded, one jitted program per group otherwise (`compute.run`)."""
  if mesh is not None:
    return sharded.decompose(plan, mesh, sharding_rules, keep_factors)
  todo = plan.factorised
  if todo and all(plan_lib.on_host(k.kernel) for k in todo):
    return host.run(plan)
  return compute.run(plan)


def inherit(
    params,
    rank: int | float | InherSpec,
    *,
    heads: int | None = None,
    rules=(),
    key: jax.Array | None = None,
    return_report: bool = False,
    mesh: Mesh | None = None,
    sharding_rules=None,
    calibration: Mapping[str, Any] | None = None,
):
  """Inherits a teacher: every selected kernel becomes a gated low-rank factorisation.

  Args:
    params: the teacher's ``params`` collection (nested dict of arrays). Not mutated.
    rank: an int rank, a float fraction of each layer's full rank in (0, 1], or an
      `InherSpec` (energy / parameter-ratio policies, rules, heads).
    heads: number of expert up-projections (overrides the spec's).
    rules: extra ``(regex, action)`` rules, tried before the spec's own.
    key: PRNG key for the new gate weights and the randomized SVD; a fixed default,
      so the same call always returns the same pytree.
    return_report: also return `inherit_report`'s rows (sharded: each kernel and its
      factors are brought to the host, one at a time, for the float64 error).
    mesh: decompose on this mesh (the sharded path, see the module docstring; a
      one-device mesh for a big single-device teacher); by default the mesh the
      kernels are sharded over, if any kernel spans several devices. Kernels not on it
      are placed by ``sharding_rules``.
    sharding_rules: `sharding` rules (or a `sharding.RULE_SETS` name; default
      `sharding.DEFAULT_RULES`) for the new params of the sharded path.
    calibration: ``{kernel path: {"gram": (*stack, m, m), "count": rows}}`` input Grams
      (`inhernet_jax.calibration.grams.input_grams`), required for every data-aware kernel
      (the spec's ``data_aware``); others only use them for the report's
      ``output_rel_error``. A data-aware kernel whose Gram is not finite falls back
      to the plain SVD, with a warning naming it.

  Returns:
    The inherited params (and the report rows when ``return_report``). Right after this
    call the inherited network computes the rank-r truncation of the teacher exactly
    (the data-aware one ``A_r = A V_r V_r^T`` for data-aware kernels, `svd.whitened_svd`).

  Raises:
    TypeError: a wrong type, naming the offending argument or leaf path.
    ValueError: a wrong value, naming the offending argument or leaf path.
  """
  plan, mesh, sharding_rules = _plan(params, rank, heads, rules, key, mesh=mesh,
                                     sharding_rules=sharding_rules, calibration=calibration)
  outs = _execute(plan, mesh, sharding_rules, keep_factors=return_report)
  out = assemble.rebuild(params, plan, outs)
  if return_report:
    return out, _report(plan, outs)
  return out


def inherit_report(params, rank: int | float | InherSpec, *, heads=None, rules=(),
                   mesh: Mesh | None = None, calibration=None) -> list[dict]:
  """One row per kernel: path, shape, action, rank, heads, energy kept, Eckart-Young
  error (absolute and relative), parameters before and after. Kept kernels appear too.
  Sharded teachers (or ``mesh``) are decomposed by the sharded path.

  With ``calibration`` Grams (see `inherit`): ``output_rel_error``, the relative output
  error ``||X (A - A_r)|| / ||X A||`` on the calibration inputs (None for factorised
  kernels without a Gram). ``data_aware`` is True for kernels truncated for it, whose
  ``energy`` is the share of the damped output energy ``||L^T A||^2`` kept; ``error``
  and ``rel_error`` stay the weight error of the factors produced."""
  plan, mesh, sharding_rules = _plan(params, rank, heads, rules, mesh=mesh, calibration=calibration)
  return _report(plan, _execute(plan, mesh, sharding_rules))


def resolve(params, rank: int | float | InherSpec, *, heads=None, rules=()) -> InherSpec:
  """Freezes a spec's decisions for ``params`` into exact per-path rules.

  Needed for data-dependent policies (energy): the layers see shapes, not singular values,
  so a model is built with the resolved spec: ``Model(spec=resolve(teacher, spec))``.
  Data-aware kernels keep ``data_aware`` (`inherit` with the resolved spec still needs
  their Grams); the rank policy uses the weights' spectra either way.
  """
  plan, _, _ = _plan(params, rank, heads, rules, execute=False)
  exact = []
  for k in plan.kernels:
    action = {"stack": k.stack}
    if k.plan.factorize:
      action.update(rank=k.plan.rank, heads=k.plan.heads)
      if k.plan.data_aware:
        action["data_aware"] = True
    else:
      action["skip"] = True
    exact.append((re.escape(k.path), action))
  return plan.spec.replace(rules=tuple(exact) + plan.spec.rules, energy=None)


def planned_param_count(params, rank: int | float | InherSpec, *, heads=None, rules=()) -> int:
  """Parameters of ``inherit(params, rank, ...)`` without computing any factorisation
  (singular values only for the energy policy); ``params`` may be abstract
  (`jax.ShapeDtypeStruct` leaves) unless the policy needs values."""
  plan, _, _ = _plan(params, rank, heads, rules, execute=False)
  total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  for k in plan.kernels:
    before, after = k.param_counts()
    total += after - before
  return total


def format_report(rows: list[dict]) -> str:
  """A plain-text table of `inherit_report` rows with a totals line."""
  head = f"{'path':<48} {'shape':<20} {'action':<9} {'rank':>5} {'H':>2} {'energy':>7} {'rel.err':>8} {'params':>12}"
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(
        f"{r['path'][-48:]:<48} {str(r['shape']):<20} {r['action']:<9} {r['rank']:>5} "
        f"{r['heads']:>2} {r['energy']:>7.4f} {r['rel_error']:>8.4f} "
        f"{r['params_before']:>6}->{r['params_after']:<6}"
        + (f"  ({r['reason']})" if r["reason"] else "")
        + ("  (data-aware)" if r.get("data_aware") else "")
    )
  before = sum(r["params_before"] for r in rows)
  after = sum(r["params_after"] for r in rows)
  # Kernels only: biases, norms and embeddings are in the whole network's count, not here.
  lines.append(f"{len(rows)} kernels: {before} -> {after} kernel parameters "
               f"({after / max(before, 1):.3f}x; biases, norms and embeddings not counted)")
  return "\n".join(lines)
