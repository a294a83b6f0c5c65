"""Property tests of the numerics' promises (issue 26): the default SVD setting's error
over the optimal one on every rank ``method="auto"`` sends to the randomized method, on
flat, slowly decaying and steep spectra, and energy targets kept by the factors.

Small shapes where the failures of the earlier code still show (512^2 with s_i = i^-3
at rank 100 gave 1.054x; s_i = i^-0.1 at 0.37 min(m, n) gave 1.015x); host path (NumPy),
as `inherit` runs on the CPU.
"""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings

from inhernet_jax.decomposition import policy, svd


def _matrix(m, n, power, seed):
  rng = np.random.default_rng(seed)
  if power == 0:
    return rng.normal(size=(m, n)).astype(np.float32)
  k = min(m, n)
  u = np.linalg.qr(rng.normal(size=(m, k)))[0]
  v = np.linalg.qr(rng.normal(size=(n, k)))[0]
  return ((u * np.arange(1, k + 1.0) ** -power) @ v.T).astype(np.float32)


def _host_truncation(a, rank, method="auto", energy_target=False):
  """What the host executor computes for one matrix under ``method``."""
  m, n = a.shape
  kwargs = {"energy_target": True} if energy_target else {}
  method = svd.resolve_method(m, n, rank, method, **kwargs)
  if method == "exact":
    u, s, v = svd.exact_svd(a[None], rank, xp=np)
  else:
    start = svd.start_matrix(None, (1, min(m, n), svd.width(m, n, rank)))
    u, s, v = svd.randomized_svd(a[None], rank, start, xp=np)
  return tuple(np.asarray(x, np.float64)[0] for x in (u, s, v))


@settings(max_examples=8, deadline=None)
@given(power=st.sampled_from([0.0, 0.1, 0.5, 3.0]), fraction=st.floats(0.05, 0.4),
       seed=st.integers(0, 2**16))
@example(power=3.0, fraction=0.3, seed=0)  # Was 1.3x (float32 LU normalisation).
@example(power=0.1, fraction=0.37, seed=0)  # Was 1.015x (too few columns).
def test_default_setting_is_within_1_percent_of_optimal(power, fraction, seed):
  a = _matrix(256, 256, power, seed)
  rank = max(1, int(fraction * 256))
  u, s, v = _host_truncation(a, rank)
  a64 = a.astype(np.float64)
  values = np.linalg.svd(a64, compute_uv=False)
  err = np.linalg.norm(a64 - (u * s) @ v.T)
  assert err <= 1.01 * np.sqrt(np.sum(values[rank:] ** 2)), (power, rank)


@settings(max_examples=6, deadline=None)
@given(energy=st.floats(0.1, 0.9), seed=st.integers(0, 2**16))
@example(energy=0.3, seed=0)  # The factors kept 0.292.
def test_energy_target_is_kept_by_the_factors(energy, seed):
  a = _matrix(256, 256, 0.0, seed)
  values = svd.singular_values(a[None], xp=np)[0]
  rank = policy.rank_for_energy(values, energy)
  u, s, v = _host_truncation(a, rank, energy_target=True)
  a64 = a.astype(np.float64)
  kept = np.linalg.norm((u * s) @ v.T) ** 2 / np.linalg.norm(a64) ** 2
  assert kept >= energy - 1e-6, (rank, kept)


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(6, 80), log_cond=st.floats(0, 4), rank=st.integers(1, 10),
       seed=st.integers(0, 2**16))
@example(rows=10, log_cond=0.0, rank=6, seed=0)  # Rank-deficient: fell back to the plain SVD.
@example(rows=80, log_cond=4.0, rank=6, seed=0)  # float32 Cholesky rejected: 13-50x.
def test_undamped_data_aware_truncation_is_optimal(rows, log_cond, rank, seed):
  """Output error ``||X (A - A_r)||`` within 1.001x of its float64 optimum (host path,
  damping 0), for full-rank and rank-deficient ``X`` (fewer rows than features)."""
  rng = np.random.default_rng(seed)
  m, n = 16, 12
  x = rng.normal(size=(rows, m)) * np.logspace(0, -log_cond, m)
  a = rng.normal(size=(m, n))
  down, s, v, _ = svd.whitened_svd(a.astype(np.float32), x.T @ x / rows, rank, 0.0, xp=np)
  approx = (np.asarray(down, np.float64) * s) @ np.asarray(v, np.float64).T
  optimum = np.sqrt(np.sum(np.linalg.svd(x @ a, compute_uv=False)[rank:] ** 2))
  # Plus float32 rounding of the returned factors (the optimum is 0 once rank >= rows).
  assert np.linalg.norm(x @ (a - approx)) <= 1.001 * optimum + 1e-6 * np.linalg.norm(x @ a)


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(6, 200), log_cond=st.floats(0, 6), rank=st.integers(1, 10),
       seed=st.integers(0, 2**16))
@example(rows=200, log_cond=5.0, rank=8, seed=0)  # Inverse square root in float32: 1.57x.
@example(rows=10, log_cond=2.0, rank=8, seed=1)  # Rank-deficient.
def test_undamped_data_aware_truncation_is_optimal_jitted(rows, log_cond, rank, seed):
  """The jitted path (float32 Gram, float32 compute) reaches the same optimum: nothing
  is inverted or Cholesky-factored (`svd.whitened_svd`)."""
  rng = np.random.default_rng(seed)
  m, n = 16, 12
  x = rng.normal(size=(rows, m)) * np.logspace(0, -log_cond, m)
  a = rng.normal(size=(m, n))
  fn = jax.jit(functools.partial(svd.whitened_svd, rank=rank, damping=0.0))
  down, s, v, ok = fn(jnp.asarray(a, jnp.float32), jnp.asarray(x.T @ x / rows, jnp.float32))
  assert bool(ok)
  approx = (np.asarray(down, np.float64) * np.asarray(s, np.float64)) @ np.asarray(v, np.float64).T
  optimum = np.sqrt(np.sum(np.linalg.svd(x @ a, compute_uv=False)[rank:] ** 2))
  assert np.linalg.norm(x @ (a - approx)) <= 1.001 * optimum + 1e-6 * np.linalg.norm(x @ a)


@settings(max_examples=6, deadline=None)
@given(shape=st.sampled_from([(128, 128), (160, 128), (128, 160)]),
       power=st.sampled_from([0.1, 1.0, 2.5, 3.0]), fraction=st.floats(0.26, 0.8),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), seed=st.integers(0, 2**16))
@example(shape=(128, 128), power=3.0, fraction=0.75, dtype=jnp.float32, seed=0)  # Was 1.25x.
@example(shape=(128, 128), power=3.0, fraction=0.5, dtype=jnp.bfloat16, seed=0)
def test_jitted_exact_svd_is_within_1_percent_of_optimal(shape, power, fraction, dtype, seed):
  """The jitted path (`inherit` under `jax.jit`, or on accelerators) on the ranks
  ``method="auto"`` sends to the exact SVD: within 1.01x of the optimal error. (XLA's
  float32 SVD on the CPU gave 1.03x / 1.25x at ranks 64 / 96 of 128^2, s_i = i^-3.)"""
  m, n = shape
  rank = max(1, int(fraction * min(m, n)))
  assert svd.resolve_method(m, n, rank, "auto") == "exact"
  a = jnp.asarray(_matrix(m, n, power, seed), dtype)
  u, s, v = (np.asarray(x, np.float64) for x in svd.truncated_svd(a, rank))
  a64 = np.asarray(a, np.float64)  # The teacher's own rounding included: what it saw.
  values = np.linalg.svd(a64, compute_uv=False)
  err = np.linalg.norm(a64 - (u * s) @ v.T)
  assert err <= 1.01 * np.sqrt(np.sum(values[rank:] ** 2)), (power, rank)
