r"""The allocation solvers of `inhernet_jax.decomposition.budget`: one option per layer within a budget.

A layer (`_Layer`) is a chain of options, rank 1, 2, ... then dense, each with its cost
(parameters) and its value (the objective: kept normalised energy). `solve` picks one
option per layer, total cost within the budget, value as large as it can: a greedy over
each layer's concave hull (dense jumps are all-or-nothing, the knapsack part), improved
by a local search of single and paired moves, or for small problems the exact optimum
over Pareto fronts. Pure NumPy; `budget.allocate` builds the layers and reads the result.

Example:
  ```python
  level = solve(layers, remaining, method="greedy", rank_floor=0.5)
  ranks = [0 if j == l.dense_option else j + 1 for l, j in zip(layers, level)]
  ```
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

_EXACT_MAX_STATES = 20_000_000  # Most (Pareto state, option) pairs the exact method visits.
_TOL = 1e-12  # Objective improvements below this are rounding, not improvements.
_FORCED = 16  # Most layers forced dense, one greedy run each.
_STARTS = 8  # Most starting points the local search improves (it costs more than a greedy).


@dataclasses.dataclass
class _Layer:
  """One kernel whose rank is ours to choose, as a chain of options.

  Option ``j`` (0-based) is rank ``j + 1`` for ``j < max_rank`` and dense for
  ``j == max_rank``; ``costs`` (parameters, whole stack) increase strictly along it,
  ``values`` (the objective: kept normalised energy, its log or its size-weighted
  value, summed over the stack) never decrease, by non-increasing steps up to the last
  (to dense). A rank floor drops the options below it (`_shifted`).
  """

  kernel: Any  # inherit._Kernel
  heads: int
  costs: np.ndarray  # (max_rank + 1,) int64
  values: np.ndarray  # (max_rank + 1,) float64

  @property
  def dense_option(self) -> int:
    return len(self.costs) - 1


# ------------------------------------------------------------------------ allocation
def _objective(layers, level) -> float:
  return float(sum(l.values[j] for l, j in zip(layers, level)))


def _cost(layers, level) -> int:
  return int(sum(int(l.costs[j]) for l, j in zip(layers, level)))


def _steps(layer: _Layer, index: int, frm: np.ndarray, to: np.ndarray) -> np.ndarray:
  """Increments ``frm -> to`` of one layer in chain order, as rows ``(layer, to, cost,
  gain, gain per parameter)``. Zero gains are dropped; rounding cannot make a row gain
  more per parameter than the one before it (it would be taken first)."""
  c, v = layer.costs, layer.values
  dc, dv = c[to] - c[frm], v[to] - v[frm]
  rows = np.stack([np.full(len(to), index), to, dc, dv, np.minimum.accumulate(dv / dc)], 1)
  return rows[dv > 0]


def _hull(layer: _Layer, index: int) -> tuple[np.ndarray, np.ndarray]:
  """A layer's increments along the upper concave hull of its options, and the rank
  steps that the hull's last increment stands for.

  Rank steps cost the same and gain non-increasing energy, so the chain is concave up
  to its last step (to dense), which may gain more per parameter than the ranks before
  it (flat spectra). Then the hull joins the tangent option ``t`` (the least gain per
  parameter from there to dense) straight to dense: one all-or-nothing increment,
  standing for the rank steps ``t -> max_rank`` and the dense step.
  """
  c, v = layer.costs, layer.values
  top = layer.dense_option
  slope = (v[top] - v[:top]) / (c[top] - c[:top])
  t = top - 1 - int(np.argmin(slope[::-1]))  # Ties: the highest option (finer steps).
  hull = _steps(layer, index, np.append(np.arange(t), t), np.append(np.arange(1, t + 1), top))
  ranks = _steps(layer, index, np.arange(t, top - 1), np.arange(t + 1, top))
  return hull, ranks


def _by_ratio(rows: np.ndarray) -> np.ndarray:
  """Rows sorted by gain per parameter, descending; ties by layer, then chain order."""
  return rows[np.lexsort((rows[:, 1], rows[:, 0], -rows[:, 4]))]


def _greedy(layers, hulls, remaining: int, force: tuple[int, int] | None = None):
  """Increments, most energy per parameter first, while they fit; returns the options.

  From rank 1 everywhere with ``remaining`` parameters to add; ``hulls`` are `_hull` per
  layer. Increments of one layer come in chain order (the hull is concave); a layer
  whose next increment does not fit takes no more (the budget only shrinks), except
  that an unaffordable jump to dense falls back to its single rank steps. Vectorised:
  take the longest prefix that fits, drop the layer that blocked it, repeat (at most
  two passes per layer).

  ``force``: ``(layer, option)`` set first, that layer then fixed; None if it does not fit.
  """
  level = np.zeros(len(layers), np.int64)
  if force is not None:
    i, option = force
    level[i] = option
    remaining -= int(layers[i].costs[option] - layers[i].costs[0])
    if remaining < 0:
      return None
    hulls = [h for j, h in enumerate(hulls) if j != i]
  rows = _by_ratio(np.concatenate([h for h, _ in hulls] or [np.zeros((0, 5))]))
  fallback = {int(r[0, 0]): r for _, r in hulls if len(r)}
  while len(rows):
    cum = np.cumsum(rows[:, 2].astype(np.int64))
    k = int(np.searchsorted(cum, remaining, side="right"))
    layer, to = rows[:k, 0].astype(np.int64), rows[:k, 1].astype(np.int64)
    np.maximum.at(level, layer, to)
    remaining -= int(cum[k - 1]) if k else 0
    if k == len(rows):
      break
    blocked = int(rows[k, 0])
    rows = rows[k + 1:][rows[k + 1:, 0] != blocked]
    ranks = fallback.pop(blocked, None)
    if ranks is not None and level[blocked] == ranks[0, 1] - 1:
      # The jump to dense was blocked: its rank steps join, in order of gain per parameter.
      at = np.searchsorted(-rows[:, 4], -ranks[:, 4], side="right")
      rows = np.insert(rows, at, ranks, axis=0)
  return level


def _improve(layers, level, remaining: int, max_moves: int) -> np.ndarray:
  """Local search: the best single step up that fits, or the best pair (one layer steps
  down, another up) that fits and raises the objective, until none does.

  Steps up: one option, or straight to dense. Steps down: one option, or to rank 1.
  """
  level = level.copy()
  n = len(layers)
  if n == 0:
    return level
  cost = lambda j: np.array([l.costs[min(x, l.dense_option)] for l, x in zip(layers, j)])
  value = lambda j: np.array([l.values[min(x, l.dense_option)] for l, x in zip(layers, j)])
  top = np.array([l.dense_option for l in layers])
  for _ in range(max_moves):
    c0, v0 = cost(level), value(level)
    ups = [np.minimum(level + 1, top), top]
    downs = [np.maximum(level - 1, 0), np.zeros_like(level)]
    up_dc = np.stack([cost(u) - c0 for u in ups])  # (2, n)
    up_dv = np.stack([value(u) - v0 for u in ups])
    down_dc = np.stack([c0 - cost(d) for d in downs])
    down_dv = np.stack([v0 - value(d) for d in downs])
    # Single steps up.
    fits = (up_dc <= remaining) & (up_dv > _TOL)
    best_single = np.where(fits, up_dv, -np.inf)
    # Pairs: layer a down (option p), layer b up (option q): (2, n, 2, n).
    gain = up_dv[None, None] - down_dv[:, :, None, None]
    extra = up_dc[None, None] - down_dc[:, :, None, None]
    ok = (extra <= remaining) & (gain > _TOL) & ~np.eye(n, dtype=bool)[None, :, None, :]
    ok &= (up_dc[None, None] > 0)
    best_pair = np.where(ok, gain, -np.inf)
    if max(best_single.max(), best_pair.max()) == -np.inf:
      break
    if best_single.max() >= best_pair.max():
      q, b = np.unravel_index(np.argmax(best_single), best_single.shape)
      remaining -= int(up_dc[q, b])
      level[b] = ups[q][b]
    else:
      p, a, q, b = np.unravel_index(np.argmax(best_pair), best_pair.shape)
      remaining -= int(extra[p, a, q, b])
      level[a], level[b] = downs[p][a], ups[q][b]
  return level


def _uniform_levels(layers, remaining: int) -> np.ndarray | None:
  """Options of the largest uniform rank that fits (rank past a layer's max_rank keeps
  it dense, as `policy.layer_plan` does), or None when rank 1 does not fit."""
  if not layers:
    return np.zeros(0, np.int64)
  top = max(l.dense_option for l in layers) + 1
  ranks = np.arange(1, top + 1)
  levels = np.stack([np.minimum(ranks - 1, l.dense_option) for l in layers])  # (n, R)
  totals = np.stack([l.costs[j] for l, j in zip(layers, levels)]).sum(0)
  ok = np.flatnonzero(totals <= remaining)
  return levels[:, ok[-1]] if ok.size else None


def _exact(layers, remaining: int) -> np.ndarray:
  """The optimum by dynamic programming over Pareto fronts (multiple-choice knapsack):
  after each layer, keep only the (cost, value) states no cheaper state beats. Small
  problems only: raises when the fronts grow past `_EXACT_MAX_STATES` pairs."""
  cost, value = np.zeros(1, np.int64), np.zeros(1)
  back = []
  mins = np.array([l.costs[0] for l in layers] + [0], np.int64)
  later = np.cumsum(mins[::-1])[::-1]  # Cheapest cost of the layers after each.
  for i, l in enumerate(layers):
    if cost.size * l.costs.size > _EXACT_MAX_STATES:
      raise ValueError(f"method='exact': {cost.size} states x {l.costs.size} options at "
                       f"{l.kernel.path} exceed {_EXACT_MAX_STATES}; use method='greedy'")
    c = (cost[:, None] + l.costs[None]).ravel()
    v = (value[:, None] + l.values[None]).ravel()
    ok = np.flatnonzero(c <= remaining - later[i + 1])
    order = ok[np.lexsort((-v[ok], c[ok]))]
    best = np.maximum.accumulate(v[order])
    keep = order[np.append(True, v[order][1:] > best[:-1] + _TOL)]  # Pareto front.
    back.append(keep)
    cost, value = c[keep], v[keep]
  level = np.zeros(len(layers), np.int64)
  state = int(np.argmax(value))
  for i in range(len(layers) - 1, -1, -1):
    flat = back[i][state]
    state, level[i] = divmod(int(flat), layers[i].costs.size)
  return level


def _floor_options(layers, uniform_level, fraction: float) -> np.ndarray:
  """Each layer's lowest option: rank ``max(1, floor(fraction * u))`` for the largest
  uniform rank ``u`` that fits (0, rank 1, when none does or ``fraction`` is 0); never
  the dense option, so that every layer keeps a choice."""
  offset = np.zeros(len(layers), np.int64)
  if not fraction or uniform_level is None or not layers:
    return offset
  u = max(int(j) + 1 for j in uniform_level)  # Layers past their max_rank are dense.
  rank = max(1, int(math.floor(fraction * u)))
  return np.array([min(rank - 1, l.dense_option - 1) for l in layers], np.int64)


def _shifted(layer: _Layer, offset: int) -> _Layer:
  """The layer with its options below ``offset`` removed (option 0 is ``offset``)."""
  if not offset:
    return layer
  return _Layer(layer.kernel, layer.heads, layer.costs[offset:], layer.values[offset:])


def solve(layers, remaining: int, *, method: str = "greedy", rank_floor: float = 0.0,
          max_moves: int | None = None) -> np.ndarray:
  """Each layer's option (0-based; ``dense_option`` is dense) within ``remaining``.

  Args:
    layers: the free `_Layer` s; rank 1 everywhere must fit.
    remaining: parameters the free layers may have together.
    method: ``"greedy"``: starts from the greedy, the greedy with one layer forced dense
      (the `_FORCED` best jumps) and uniform; the `_STARTS` best are improved by local
      search. ``"exact"``: the optimum over Pareto fronts (small problems only).
    rank_floor: a fraction of the largest uniform rank ``u``: every layer keeps rank
      ``max(1, floor(rank_floor * u))`` at least (`_floor_options`).
    max_moves: most local-search moves (default ``10 * layers + 100``).

  Example:
    ```python
    level = solve(layers, budget - other_params, method="exact")
    ```
  """
  uniform_level = _uniform_levels(layers, remaining)
  offset = _floor_options(layers, uniform_level, rank_floor)
  layers = [_shifted(l, o) for l, o in zip(layers, offset)]
  if method == "exact":
    return _exact(layers, remaining) + offset
  floor = int(sum(int(l.costs[0]) for l in layers))
  moves = 10 * len(layers) + 100 if max_moves is None else max_moves
  # Starts: the greedy; the greedy with a layer forced dense (dense jumps are
  # all-or-nothing, the knapsack part of the problem), for the layers whose jump gains
  # the most per parameter; uniform (so, the floor).
  hulls = [_hull(l, i) for i, l in enumerate(layers)]
  greedy = _greedy(layers, hulls, remaining - floor)
  jumps = [(-h[-1, 4], i) for i, (h, _) in enumerate(hulls)
           if len(h) and greedy[i] != layers[i].dense_option]
  starts = [greedy, None if uniform_level is None else uniform_level - offset] + [
      _greedy(layers, hulls, remaining - floor, (i, layers[i].dense_option))
      for _, i in sorted(jumps)[:_FORCED]]
  starts = [s for s in starts if s is not None]
  # The local search costs more than a greedy pass: improve the best few starts only.
  starts = sorted(starts, key=lambda s: -_objective(layers, s))[:_STARTS]
  finals = [_improve(layers, s, remaining - _cost(layers, s), moves) for s in starts]
  return max(finals, key=lambda s: _objective(layers, s)) + offset


__all__ = ["solve"]
