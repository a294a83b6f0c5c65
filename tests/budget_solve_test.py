"""Tests for inhernet_jax.decomposition.budget_solve: the allocation solvers on hand-made option chains.

Pure NumPy, no model: each layer is a chain of costs and concave values, and the
exact solver is held against brute force over every combination of options.
"""

import itertools
import types

import numpy as np
import pytest

from inhernet_jax.decomposition.budget_solve import _cost, _Layer, _objective, solve


def _layers(rng, count):
  """Random chains: rank steps of equal cost, shrinking gains, then a dense option."""
  out = []
  for i in range(count):
    max_rank = int(rng.integers(1, 5))
    base, step = int(rng.integers(2, 10)), int(rng.integers(1, 6))
    costs = np.append(base + step * np.arange(max_rank), base + step * max_rank + 3)
    gains = np.sort(rng.random(max_rank + 1))[::-1]
    out.append(_Layer(types.SimpleNamespace(path=f"layer_{i}"), 1,
                      costs.astype(np.int64), np.cumsum(gains)))
  return out


def _brute_force(layers, remaining):
  best = -np.inf
  for level in itertools.product(*(range(l.costs.size) for l in layers)):
    if _cost(layers, np.array(level)) <= remaining:
      best = max(best, _objective(layers, np.array(level)))
  return best


@pytest.mark.parametrize("seed", range(6))
def test_exact_is_the_brute_force_optimum_and_greedy_fits(seed):
  rng = np.random.default_rng(seed)
  layers = _layers(rng, int(rng.integers(2, 5)))
  lowest, highest = sum(int(l.costs[0]) for l in layers), sum(int(l.costs[-1]) for l in layers)
  remaining = int(rng.integers(lowest, highest + 1))
  exact = solve(layers, remaining, method="exact")
  assert _cost(layers, exact) <= remaining
  np.testing.assert_allclose(_objective(layers, exact), _brute_force(layers, remaining))
  greedy = solve(layers, remaining, method="greedy")
  assert _cost(layers, greedy) <= remaining
  assert _objective(layers, greedy) <= _objective(layers, exact) + 1e-9


def test_rank_floor_keeps_the_uniform_rank_where_energy_would_go_elsewhere():
  costs = np.array([2, 3, 4, 10], np.int64)
  rich = _Layer(types.SimpleNamespace(path="rich"), 1, costs, np.array([1.0, 1.9, 2.7, 3.0]))
  poor = [_Layer(types.SimpleNamespace(path=f"poor_{i}"), 1, costs,
                 np.array([0.1, 0.11, 0.115, 0.116])) for i in range(2)]
  layers, remaining = [rich, *poor], 3 * 3  # Uniform rank 2 fits exactly.
  free = solve(layers, remaining, rank_floor=0.0)
  assert free[0] > 1 and min(free[1:]) == 0  # The rich layer takes the poor ones' rank.
  np.testing.assert_array_equal(solve(layers, remaining, rank_floor=1.0), [1, 1, 1])
  np.testing.assert_array_equal(solve(layers, remaining, method="exact", rank_floor=1.0),
                                [1, 1, 1])
