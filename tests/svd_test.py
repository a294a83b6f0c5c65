"""Tests for `inhernet_jax.decomposition.svd`: truncation, spectral quantities, parameter counts.

References are computed independently in float64 numpy; the library runs in float32
(x64 is off), so comparisons carry float32 tolerances scaled by the matrix norm.
"""

import math

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from inhernet_jax.decomposition import policy
from inhernet_jax.decomposition import svd
from inhernet_jax.layers.linen import InherDense
from inhernet_jax.decomposition.svd import canonical_signs
from inhernet_jax.decomposition.spec import InherSpec

# float32 SVD: backward error is a small multiple of eps32 * ||A||.
F32_ATOL = 3e-5


# ------------------------------------------------------------------------ strategies
@st.composite
def matrices(draw, max_m=12, max_n=10, generic=False):
  """Small float32 matrices: gaussian, exactly low rank, or hypothesis-drawn entries.

  ``generic=True`` draws only gaussian matrices (full rank with probability one and
  well separated singular values, so singular vectors are well defined).
  """
  m = draw(st.integers(1, max_m))
  n = draw(st.integers(1, max_n))
  kinds = ["gaussian"] if generic else ["gaussian", "low_rank", "entries"]
  kind = draw(st.sampled_from(kinds))
  if kind == "entries":
    elements = st.floats(-8, 8, width=32, allow_subnormal=False)
    return draw(hnp.arrays(np.float32, (m, n), elements=elements))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
  if kind == "gaussian":
    a = rng.standard_normal((m, n))
  else:
    k = draw(st.integers(1, min(m, n)))
    a = rng.standard_normal((m, k)) @ rng.standard_normal((k, n))
  return (scale * a).astype(np.float32)


def np_singular_values(a):
  return np.linalg.svd(np.asarray(a, np.float64), compute_uv=False)


def np_tail_error(a, rank):
  s = np_singular_values(a)
  return float(np.sqrt(np.sum(s[rank:] ** 2)))


def reconstruct(u, s, v):
  u, s, v = (np.asarray(x, np.float64) for x in (u, s, v))
  return (u * s[..., None, :]) @ np.swapaxes(v, -1, -2)


def count_inherited(m, n, r, heads, use_bias):
  """Parameter count written out from the method notes (independent of the library)."""
  down = m * r
  ups = heads * r * n + (heads * n if use_bias else 0)
  gate = (r * heads + heads) if heads > 1 else 0
  return down + ups + gate


def count_dense(m, n, use_bias):
  return m * n + (n if use_bias else 0)


def assert_orthonormal_columns(x, atol):
  x = np.asarray(x, np.float64)
  k = x.shape[-1]
  chex.assert_trees_all_close(np.swapaxes(x, -1, -2) @ x, np.broadcast_to(np.eye(k), (*x.shape[:-2], k, k)), atol=atol)


def random_spectrum_matrix(m, n, s, seed):
  """``U diag(s) V^T`` with random orthonormal U, V and the given singular values."""
  rng = np.random.default_rng(seed)
  k = min(m, n)
  u = np.linalg.qr(rng.standard_normal((m, k)))[0]
  v = np.linalg.qr(rng.standard_normal((n, k)))[0]
  return ((u * np.asarray(s)[:k]) @ v.T).astype(np.float32)


# ----------------------------------------------------------------------- Eckart-Young
@hypothesis.settings(max_examples=15)
@hypothesis.given(a=matrices(), data=st.data())
def test_truncation_error_equals_eckart_young(a, data):
  rank = data.draw(st.integers(1, min(a.shape)), label="rank")
  u, s, v = svd.truncated_svd(a, rank, method="exact")
  chex.assert_shape([u, s, v], [(a.shape[0], rank), (rank,), (a.shape[1], rank)])
  err = np.linalg.norm(np.asarray(a, np.float64) - reconstruct(u, s, v))
  predicted = float(svd.eckart_young_error(svd.singular_values(a), rank))
  norm = np.linalg.norm(np.asarray(a, np.float64))
  tol = dict(rtol=1e-4, atol=F32_ATOL * norm + 1e-30)
  np.testing.assert_allclose(err, predicted, **tol)
  # And both agree with an independent float64 reference.
  np.testing.assert_allclose(predicted, np_tail_error(a, rank), **tol)
  # Singular values are the top ones, descending.
  np.testing.assert_allclose(np.asarray(s), np_singular_values(a)[:rank], rtol=1e-4, atol=F32_ATOL * norm + 1e-30)


@st.composite
def rank_r_candidates(draw, a, rank):
  """Rank-``rank`` matrices ``B @ C``: arbitrary, or perturbations of the optimum."""
  m, n = a.shape
  if draw(st.booleans()):
    elements = st.floats(-4, 4, width=32, allow_subnormal=False)
    b = draw(hnp.arrays(np.float64, (m, rank), elements=elements))
    c = draw(hnp.arrays(np.float64, (rank, n), elements=elements))
    return b * np.sqrt(np.linalg.norm(a) + 1e-30), c * np.sqrt(np.linalg.norm(a) + 1e-30)
  u, s, vt = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  eps = draw(st.sampled_from([0.0, 1e-4, 1e-2, 1.0])) * (s[0] if s.size else 1.0)
  b = u[:, :rank] * s[:rank] + eps * rng.standard_normal((m, rank))
  c = vt[:rank] + eps * rng.standard_normal((rank, n)) / max(s[0], 1e-30)
  return b, c


@hypothesis.settings(max_examples=20)
@hypothesis.given(a=matrices(), data=st.data())
def test_no_rank_r_matrix_beats_eckart_young(a, data):
  rank = data.draw(st.integers(1, min(a.shape)), label="rank")
  b, c = data.draw(rank_r_candidates(a, rank), label="candidate")
  best = float(svd.eckart_young_error(svd.singular_values(a), rank))
  norm = np.linalg.norm(np.asarray(a, np.float64))
  other = np.linalg.norm(np.asarray(a, np.float64) - b @ c)
  assert other >= best * (1 - 1e-4) - F32_ATOL * norm, (other, best)


# ------------------------------------------------------------------- orthonormality
@hypothesis.settings(max_examples=15)
@hypothesis.given(a=matrices(generic=True), data=st.data())
def test_exact_factors_are_orthonormal(a, data):
  rank = data.draw(st.integers(1, min(a.shape)), label="rank")
  u, s, v = svd.truncated_svd(a, rank, method="exact")
  assert_orthonormal_columns(u, 1e-5)
  assert_orthonormal_columns(v, 1e-5)
  s = np.asarray(s)
  assert np.all(s >= 0) and np.all(np.diff(s) <= 0)


@hypothesis.settings(max_examples=6)
@hypothesis.given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from([(40, 24), (24, 40)]),
    rank=st.integers(1, 4),
    oversample=st.sampled_from([None, 2]),
    power_iters=st.sampled_from([0, 2, 4]),
)
def test_randomized_factors_are_orthonormal(seed, shape, rank, oversample, power_iters):
  a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  u, s, v = svd.truncated_svd(
      a, rank, jax.random.key(seed % 1000), method="randomized", oversample=oversample,
      power_iters=power_iters,
  )
  chex.assert_shape([u, s, v], [(shape[0], rank), (rank,), (shape[1], rank)])
  assert_orthonormal_columns(u, 1e-4)
  assert_orthonormal_columns(v, 1e-4)
  s = np.asarray(s)
  assert np.all(s >= 0) and np.all(np.diff(s) <= 1e-6 * s[0])
  # Ritz values never exceed the true singular values (interlacing).
  assert np.all(s <= np_singular_values(a)[:rank] * (1 + 1e-5))


def test_randomized_factors_orthonormal_for_rank_deficient_matrix():
  rng = np.random.default_rng(0)
  a = (rng.standard_normal((512, 2)) @ rng.standard_normal((2, 256))).astype(np.float32)
  assert svd.use_randomized(512, 256, 8)
  u, s, v = svd.truncated_svd(a, 8)  # auto -> randomized
  assert_orthonormal_columns(v, 1e-4)
  assert_orthonormal_columns(u, 1e-4)


def test_randomized_accurate_on_steeply_decaying_spectrum():
  spectrum = 0.3 ** np.arange(256)  # s_8 / s_1 ~ 2e-4
  a = random_spectrum_matrix(512, 256, spectrum, seed=1)
  assert svd.use_randomized(512, 256, 8)
  u, s, v = svd.truncated_svd(a, 8)
  np.testing.assert_allclose(np.asarray(s), np_singular_values(a)[:8], rtol=1e-3)
  assert_orthonormal_columns(u, 1e-3)


# -------------------------------------------------------------------- monotonicity
@hypothesis.settings(max_examples=10)
@hypothesis.given(a=matrices(max_m=8, max_n=8))
def test_error_and_energy_monotone_in_rank(a):
  k = min(a.shape)
  s = svd.singular_values(a)
  norm2 = float(np.sum(np.asarray(a, np.float64) ** 2))
  errors = np.array([float(svd.eckart_young_error(s, r)) for r in range(k + 1)])
  energies = np.array([float(svd.energy_kept(s, r)) for r in range(k + 1)])
  slack = 1e-6 * (errors[0] + 1e-30)
  assert np.all(np.diff(errors) <= slack), errors
  assert np.all(np.diff(energies) >= -1e-6), energies
  np.testing.assert_allclose(errors[0], np.sqrt(norm2), rtol=1e-5)
  assert errors[-1] <= 1e-6 * np.sqrt(norm2) + 1e-30
  assert energies[-1] == pytest.approx(1.0, abs=1e-6)
  # Kept energy and the squared error split the total.
  if norm2 > 0:
    np.testing.assert_allclose(energies * norm2 + errors**2, norm2, rtol=1e-4)
  # The actual truncations are monotone too (one SVD, truncated by slicing).
  u, s_full, v = (np.asarray(x, np.float64) for x in svd.truncated_svd(a, k, method="exact"))
  actual = [np.linalg.norm(a - (u[:, :r] * s_full[:r]) @ v[:, :r].T) for r in range(1, k + 1)]
  assert np.all(np.diff(actual) <= F32_ATOL * np.sqrt(norm2) + 1e-30), actual


def test_zero_matrix_spectral_quantities():
  s = svd.singular_values(np.zeros((4, 3), np.float32))
  assert float(svd.energy_kept(s, 1)) == 1.0
  assert float(svd.eckart_young_error(s, 1)) == 0.0


# ------------------------------------------------------------------ randomized method
def _decaying(m, n, seed):
  return random_spectrum_matrix(m, n, 0.7 ** np.arange(min(m, n)), seed)


def _gaussian(m, n, seed):
  return np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)


@pytest.mark.parametrize(
    "make, m, n",
    [(_decaying, 512, 256), (_gaussian, 512, 256), (_decaying, 256, 512)],
    ids=["decaying-512x256", "gaussian-512x256", "decaying-256x512"],
)
def test_randomized_matches_exact(make, m, n):
  rank = 8
  a = make(m, n, seed=m + n)
  assert svd.use_randomized(m, n, rank)
  u, s, v = svd.truncated_svd(a, rank)  # auto
  # `auto` is exactly the randomized method here.
  chex.assert_trees_all_equal((u, s, v), svd.truncated_svd(a, rank, method="randomized"))
  ref_u, ref_s, ref_vt = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
  assert_orthonormal_columns(u, 1e-4)
  assert_orthonormal_columns(v, 1e-4)
  err = np.linalg.norm(a - reconstruct(u, s, v))
  best = np.sqrt(np.sum(ref_s[rank:] ** 2))
  assert err <= best * 1.01  # The documented default: within 1% of optimal.
  # Flat spectra (Gaussian): 4 power iterations leave the top values a few % low.
  np.testing.assert_allclose(np.asarray(s), ref_s[:rank], rtol=1e-3 if make is _decaying else 0.05)
  if make is _decaying:  # Well separated: the singular vectors themselves match.
    assert err <= best * (1 + 1e-4)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(u) * ref_u[:, :rank], 0)), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(v) * ref_vt[:rank].T, 0)), 1.0, atol=1e-3)


def test_auto_uses_exact_where_use_randomized_says_so():
  a = _gaussian(40, 24, seed=3)
  assert not svd.use_randomized(40, 24, 4)
  chex.assert_trees_all_equal(svd.truncated_svd(a, 4), svd.truncated_svd(a, 4, method="exact"))


# ------------------------------------------------------------------------- batching
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_batched_equals_per_matrix(method):
  rng = np.random.default_rng(7)
  a = rng.standard_normal((2, 3, 9, 7)).astype(np.float32)
  rank = 3
  u, s, v = svd.truncated_svd(a, rank, method=method)
  chex.assert_shape([u, s, v], [(2, 3, 9, rank), (2, 3, rank), (2, 3, 7, rank)])
  sv_all = svd.singular_values(a)
  for i in range(2):
    for j in range(3):
      ui, si, vi = svd.truncated_svd(a[i, j], rank, method=method)
      np.testing.assert_allclose(np.asarray(s[i, j]), np.asarray(si), rtol=1e-5)
      # Singular vectors agree up to sign (distinct singular values).
      signs = np.sign(np.sum(np.asarray(u[i, j]) * np.asarray(ui), 0))
      np.testing.assert_allclose(np.asarray(u[i, j]) * signs, np.asarray(ui), atol=1e-5)
      np.testing.assert_allclose(np.asarray(v[i, j]) * signs, np.asarray(vi), atol=1e-5)
      np.testing.assert_allclose(np.asarray(sv_all[i, j]), np.asarray(svd.singular_values(a[i, j])), rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(svd.eckart_young_error(sv_all, rank)),
      np.sqrt(np.sum(np.asarray(sv_all, np.float64)[..., rank:] ** 2, -1)),
      rtol=1e-5,
  )
  chex.assert_shape(svd.energy_kept(sv_all, rank), (2, 3))


# -------------------------------------------------------------------------- layouts
@hypothesis.settings(max_examples=25)
@hypothesis.given(
    stack=st.lists(st.integers(1, 3), max_size=2),
    in_shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    out=st.integers(1, 5),
    k=st.integers(1, 4),
)
def test_as_matrix_from_matrix_round_trip(stack, in_shape, out, k):
  """Dense (1 in-axis), 1D/2D/3D conv kernels (2-4 in-axes), with 0-2 stack axes."""
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((*stack, *in_shape, out)).astype(np.float32)
  mat = svd.as_matrix(kernel, stack=len(stack))
  assert mat.shape == (*stack, math.prod(in_shape), out)
  np.testing.assert_array_equal(svd.from_matrix(mat, in_shape), kernel)
  # A factor with k != out columns maps back to the kernel's input layout.
  factor = rng.standard_normal((*stack, math.prod(in_shape), k)).astype(np.float32)
  back = svd.from_matrix(factor, in_shape)
  assert back.shape == (*stack, *in_shape, k)
  np.testing.assert_array_equal(svd.as_matrix(back, stack=len(stack)), factor)
  # y = x @ A: a patch over the input axes, flattened, contracts with the matrix exactly
  # as with the kernel itself.
  patch = rng.standard_normal(in_shape).astype(np.float64)
  direct = np.tensordot(patch, np.asarray(kernel, np.float64), axes=(list(range(len(in_shape))), list(range(len(stack), len(stack) + len(in_shape)))))
  via_matrix = np.einsum("i,...io->...o", patch.reshape(-1), np.asarray(mat, np.float64))
  np.testing.assert_allclose(direct, via_matrix, rtol=1e-10, atol=1e-10)


def test_as_matrix_on_jax_arrays():
  kernel = jnp.arange(2 * 3 * 3 * 2 * 4, dtype=jnp.float32).reshape(2, 3, 3, 2, 4)
  mat = svd.as_matrix(kernel, stack=1)
  chex.assert_shape(mat, (2, 18, 4))
  chex.assert_trees_all_equal(svd.from_matrix(mat, (3, 3, 2)), kernel)


# ------------------------------------------------------------------ rank for energy
@hypothesis.settings(max_examples=25)
@hypothesis.given(
    s=st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1e3)), min_size=1, max_size=12),
    energy=st.one_of(st.floats(1e-6, 1.0, exclude_min=False), st.just(1.0)),
)
def test_rank_for_energy_is_smallest_meeting_threshold(s, energy):
  s = np.sort(np.asarray(s))[::-1]
  r = policy.rank_for_energy(s, energy)
  assert isinstance(r, int) and 1 <= r <= len(s)
  s2 = s.astype(np.float64) ** 2
  total = s2.sum()
  if total == 0:
    assert r == 1
    return
  kept = lambda k: s2[:k].sum() / total  # noqa: E731
  assert kept(r) >= energy - 1e-9, (r, kept(r), energy)
  # Brute force: no smaller rank meets it.
  smallest = next(k for k in range(1, len(s) + 1) if kept(k) >= energy - 1e-12)
  assert r <= smallest
  for k in range(1, r):
    assert kept(k) < energy, (k, kept(k), energy)


def test_rank_for_energy_full_energy_counts_nonzero_values():
  assert policy.rank_for_energy([5.0, 3.0, 2.0, 0.0, 0.0], 1.0) == 3
  assert policy.rank_for_energy([5.0, 3.0, 2.0], 1.0) == 3
  assert policy.rank_for_energy([0.0, 0.0], 0.5) == 1


# --------------------------------------------------------------- parameter counting
def given_layer(max_dim: int):
  """Hypothesis over one layer: ``m, n <= max_dim``, heads, bias, and ``data`` to draw a rank."""
  return hypothesis.given(m=st.integers(1, max_dim), n=st.integers(1, max_dim),
                          heads=st.integers(1, 4), use_bias=st.booleans(), data=st.data())


@hypothesis.settings(max_examples=15)
@given_layer(24)
def test_param_counts_match_real_layers(m, n, heads, use_bias, data):
  rank = data.draw(st.integers(1, min(m, n)), label="rank")
  x = jax.ShapeDtypeStruct((2, m), jnp.float32)
  key = jax.random.key(0)

  def size(module):
    shapes = jax.eval_shape(module.init, key, x)["params"]
    return sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))

  spec = InherSpec(rank=rank, heads=heads, skip_if_no_saving=False)
  assert size(InherDense(n, use_bias=use_bias, spec=spec)) == policy.inherited_params(m, n, rank, heads, use_bias)
  assert size(InherDense(n, use_bias=use_bias)) == policy.dense_params(m, n, use_bias)
  assert policy.inherited_params(m, n, rank, heads, use_bias) == count_inherited(m, n, rank, heads, use_bias)
  assert policy.dense_params(m, n, use_bias) == count_dense(m, n, use_bias)


@hypothesis.settings(max_examples=25)
@hypothesis.given(
    m=st.integers(1, 300),
    n=st.integers(1, 300),
    ratio=st.floats(1e-4, 1.0),
    heads=st.integers(1, 4),
    use_bias=st.booleans(),
)
def test_rank_for_param_ratio_is_largest_within_budget(m, n, ratio, heads, use_bias):
  r = policy.rank_for_param_ratio(m, n, ratio, heads, use_bias)
  assert isinstance(r, int) and 0 <= r <= min(m, n)
  budget = ratio * count_dense(m, n, use_bias)
  fits = [k for k in range(1, min(m, n) + 1) if count_inherited(m, n, k, heads, use_bias) <= budget]
  assert r == (max(fits) if fits else 0), (r, fits[-3:])
  if r:
    assert count_inherited(m, n, r, heads, use_bias) <= budget
  if r < min(m, n):
    assert count_inherited(m, n, r + 1, heads, use_bias) > budget


@hypothesis.settings(max_examples=25)
@given_layer(500)
def test_compression_ratio(m, n, heads, use_bias, data):
  rank = data.draw(st.integers(1, min(m, n)), label="rank")
  ratio = policy.compression_ratio(m, n, rank, heads, use_bias)
  expected = count_dense(m, n, use_bias) / count_inherited(m, n, rank, heads, use_bias)
  assert ratio == pytest.approx(expected, rel=1e-12)
  assert (ratio > 1) == (count_inherited(m, n, rank, heads, use_bias) < count_dense(m, n, use_bias))
  if heads == 1 and not use_bias:  # The paper's mn / (H r (m + n)) is exact here.
    assert ratio == pytest.approx(m * n / (rank * (m + n)), rel=1e-12)


# ---------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_low_precision_input_computes_in_float32(dtype, method):
  assert svd.compute_dtype() == jnp.float32
  a = jnp.asarray(_gaussian(9, 7, seed=0), dtype)
  u, s, v = svd.truncated_svd(a, 3, method=method)
  for x in (u, s, v, svd.singular_values(a)):
    assert x.dtype == jnp.float32
  # Same answer as the float32 SVD of the same (rounded) values.
  ref = np_singular_values(np.asarray(a.astype(jnp.float32)))[:3]
  np.testing.assert_allclose(np.asarray(s), ref, rtol=1e-4)


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize("rank", [0, -1, 8])
def test_truncated_svd_rejects_bad_rank(rank):
  a = np.ones((9, 7), np.float32)
  with pytest.raises(ValueError, match="rank"):
    svd.truncated_svd(a, rank)


def test_truncated_svd_rejects_unknown_method():
  with pytest.raises(ValueError, match="method"):
    svd.truncated_svd(np.ones((3, 3), np.float32), 1, method="lanczos")


@pytest.mark.parametrize(
    "make, m, n",
    [(_decaying, 512, 256), (_gaussian, 256, 512)],
    ids=["decaying-512x256", "gaussian-256x512"],
)
def test_host_numpy_and_jax_randomized_agree(make, m, n):
  """`inherit` runs `randomized_svd` in NumPy on the host and jitted elsewhere: from
  the same start matrix, the same factors up to float32 rounding."""
  rank = 8
  a = make(m, n, seed=7)
  start = np.asarray(svd.start_matrix(jax.random.key(3), (min(m, n), svd.width(m, n, rank))))
  host = svd.randomized_svd(a, rank, start, xp=np)
  dev = jax.jit(svd.randomized_svd, static_argnums=(1, 3))(jnp.asarray(a), rank, start, svd.POWER_ITERS)
  assert all(isinstance(x, np.ndarray) for x in host)
  # Up to the sign of each singular pair (LAPACK builds differ; `inherit` fixes them).
  host = (*canonical_signs(host[0], host[2], xp=np), host[1])
  dev = (*canonical_signs(np.asarray(dev[0]), np.asarray(dev[2]), xp=np), dev[1])
  host, dev = (host[0], host[2], host[1]), (dev[0], dev[2], dev[1])
  # Separated singular values (decaying): the factors agree. Flat (Gaussian) ones are
  # ill-conditioned (gaps of ~1%: rounding turns pairs of vectors), so there the
  # truncation A_r they compute agrees.
  # (With sigma_r / sigma_{r+1} ~ 1.01 the truncation itself moves with rounding: 5e-5.)
  pairs = zip(host, dev) if make is _decaying else [(reconstruct(*host), reconstruct(*dev))]
  tol = 1e-5 if make is _decaying else 5e-5
  for h, d in pairs:
    d = np.asarray(d, np.float64)
    assert np.linalg.norm(h - d) <= tol * np.linalg.norm(d), np.linalg.norm(h - d) / np.linalg.norm(d)
  assert_orthonormal_columns(host[0], 1e-4)
  assert_orthonormal_columns(host[2], 1e-4)
  best = np.sqrt(np.sum(np_singular_values(a)[rank:] ** 2))
  assert np.linalg.norm(a - reconstruct(*host)) <= best * 1.01


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_tiny_and_huge_entries_keep_relative_accuracy(method, scale):
  """Decompositions run on ``a / max|a|``: entries near 1e-20 (whose squares underflow
  float32) or 1e20 (overflow) give the scale-1 factors, singular values scaled."""
  a = _decaying(256, 128, seed=2)
  ref = svd.truncated_svd(a, 8, method=method)
  got = svd.truncated_svd((a.astype(np.float64) * scale).astype(np.float32), 8, method=method)
  np.testing.assert_allclose(np.asarray(got[1]) / scale, np.asarray(ref[1]), rtol=1e-5)
  for g, r in ((got[0], ref[0]), (got[2], ref[2])):
    signs = np.sign(np.sum(np.asarray(g) * np.asarray(r), 0))
    np.testing.assert_allclose(np.asarray(g) * signs, np.asarray(r), atol=1e-5)
  np.testing.assert_allclose(np.asarray(svd.singular_values(a * np.float32(scale))) / scale,
                             np.asarray(svd.singular_values(a)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
def test_normalize_divides_by_a_power_of_two_without_rounding(xp):
  rng = np.random.default_rng(3)
  a = np.stack([rng.standard_normal((5, 4)) * 3.7, np.zeros((5, 4)), rng.standard_normal((5, 4)) * 1e-30,
                np.full((5, 4), 2.0**100), np.full((5, 4), 3e38)]).astype(np.float32)
  unit, scale = (np.asarray(x) for x in svd.normalize(a if xp is np else jnp.asarray(a), xp=xp))
  np.testing.assert_array_equal(unit * scale[:, None, None], a)  # Nothing rounded.
  mantissa, _ = np.frexp(scale)
  np.testing.assert_array_equal(mantissa, 0.5)  # Powers of two.
  peak = np.abs(unit).max(axis=(-2, -1))
  assert np.all((peak[[0, 2, 3]] >= 0.5) & (peak[[0, 2, 3]] < 1)) and peak[1] == 0 and peak[4] < 4


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
@pytest.mark.parametrize("scale", [1e-40, 1e40])
def test_whitened_factors_of_a_float64_gram_beyond_float32_range(xp, scale):
  """A float64 Gram near 1e-40 / 1e40 (its scale and square root taken in float64,
  before the cast): the scale-1 truncation, whitened (not the plain-SVD fallback)."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((12, 5)).astype(np.float32)
  x = rng.standard_normal((40, 12))
  gram = x.T @ x
  ref = svd.whitened_svd(a, gram, 3, xp=np)
  got = svd.whitened_svd(a, gram * scale, 3, xp=xp)
  values, ok = svd.whitened_values(a, gram * scale, xp=xp)
  assert got[3] and ok
  np.testing.assert_allclose(reconstruct(*got[:3]), reconstruct(*ref[:3]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got[1], np.float64) / np.sqrt(scale), ref[1], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(values, np.float64)[:3] / np.sqrt(scale), ref[1], rtol=1e-4)


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_whitened_svd_scale_safe(scale):
  rng = np.random.default_rng(0)
  a = rng.standard_normal((12, 5)).astype(np.float32)
  x = rng.standard_normal((40, 12))
  gram = (x.T @ x).astype(np.float32)
  ref = svd.whitened_svd(a, gram, 3, xp=np)
  got = svd.whitened_svd(a, (gram.astype(np.float64) * scale).astype(np.float32), 3, xp=np)
  assert got[3] and ref[3]
  # The same A_r; its factors and singular values carry the Gram's scale.
  np.testing.assert_allclose(reconstruct(*got[:3]), reconstruct(*ref[:3]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got[1] / np.sqrt(scale), ref[1], rtol=1e-4)


def test_default_beats_pissa_fast_svd():
  """The default randomized setting: error <= PiSSA's ``svd_lowrank(q=r, niter=4)`` on
  the same matrix and <= 1.01x optimal, on flat and decaying spectra."""
  torch = pytest.importorskip("torch")
  rank = 32
  for a in (_gaussian(512, 384, seed=5), random_spectrum_matrix(384, 512, 1 / np.sqrt(np.arange(1, 385)), 6)):
    best = np_tail_error(a, rank)
    ours = np.linalg.norm(a - reconstruct(*svd.truncated_svd(a, rank)))
    u, s, v = torch.svd_lowrank(torch.from_numpy(a), q=rank, niter=4)
    pissa = np.linalg.norm(a - reconstruct(u.numpy(), s.numpy(), v.numpy()))
    assert ours <= min(pissa, 1.01 * best), (ours / best, pissa / best)


def test_spectral_quantities_of_tiny_and_huge_singular_values():
  # float32 squares of 1e-30 underflow to 0 and of 1e30 overflow to inf; both are
  # computed on s / max(s) (the case hypothesis found: a 1x1 matrix of 4.67e-31).
  for scale in (4.67413e-31, 1e-20, 1.0, 1e25):
    s = jnp.array([3.0, 2.0, 1.0], jnp.float32) * scale
    np.testing.assert_allclose(float(svd.eckart_young_error(s, 0)), np.sqrt(14.0) * scale, rtol=1e-5)
    np.testing.assert_allclose(float(svd.eckart_young_error(s, 1)), np.sqrt(5.0) * scale, rtol=1e-5)
    np.testing.assert_allclose(float(svd.energy_kept(s, 1)), 9.0 / 14.0, rtol=1e-5)
  assert float(svd.eckart_young_error(jnp.zeros(3), 0)) == 0.0
  assert float(svd.energy_kept(jnp.zeros(3), 1)) == 1.0


# ------------------------------------------------------------ data-aware truncation
def np_damped_gram(x, damping):
  g = np.asarray(x, np.float64).T @ np.asarray(x, np.float64)
  return g + damping * np.mean(np.diag(g)) * np.eye(g.shape[0])


def np_output_sq_error(a, approx, g):
  """``tr(E^T G E)``: the squared output error of ``approx`` for inputs with Gram ``g``."""
  e = np.asarray(a, np.float64) - approx
  return float(np.sum(e * (g @ e)))


@st.composite
def calibrated(draw):
  """A kernel, correlated inputs (some draws rank deficient), a rank and a damping."""
  m, n = draw(st.integers(2, 9)), draw(st.integers(1, 7))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  rows = draw(st.sampled_from([m // 2 + 1, 3 * m]))  # Fewer rows than m: singular X^T X.
  x = rng.standard_normal((rows, m)) @ rng.standard_normal((m, m)) * rng.uniform(0.1, 3, m)
  a = rng.standard_normal((m, n)) * draw(st.sampled_from([1e-2, 1.0, 1e2]))
  damping = draw(st.sampled_from([0.01, 0.3] if rows < m else [0.0, 0.01, 0.3]))
  return a.astype(np.float32), x.astype(np.float32), draw(st.integers(1, min(m, n))), damping


@hypothesis.settings(max_examples=15)
@hypothesis.given(case=calibrated())
def test_whitened_truncation_is_optimal_for_the_damped_output_error(case):
  a, x, rank, damping = case
  g = np_damped_gram(x, damping)
  down, s, v, ok = svd.whitened_svd(a, x.T @ x, rank, damping, xp=np)
  chex.assert_shape([down, s, v], [(a.shape[0], rank), (rank,), (a.shape[1], rank)])
  approx = reconstruct(down, s, v)
  if not ok:  # Documented (`svd.whitening`): an undamped Gram singular up to float32
    # rounding (nearly dependent input features, which square rows can draw too) skips
    # whitening, and the result is the plain truncation.
    w = np.linalg.eigvalsh(np.asarray(x, np.float64).T @ x)
    assert damping == 0.0 and w[0] <= svd.PIVOT_TOL * np.finfo(np.float32).eps * w[-1]
    plain = reconstruct(*svd.exact_svd(a, rank, xp=np))
    np.testing.assert_allclose(approx, plain, atol=1e-5 * np.abs(a).max())
    return
  # Independent optimum: Eckart-Young on G^{1/2} A (symmetric root by eigh, not Cholesky).
  w, q = np.linalg.eigh(g)
  root = (q * np.sqrt(np.maximum(w, 0))) @ q.T
  tail = np.linalg.svd(root @ a.astype(np.float64), compute_uv=False)[rank:]
  total = np_output_sq_error(a, 0.0, g)
  best = float(np.sum(tail**2))
  got = np_output_sq_error(a, approx, g)
  np.testing.assert_allclose(got, best, rtol=2e-3, atol=1e-4 * total)
  np.testing.assert_allclose(np.sum(np.asarray(s, np.float64) ** 2) + best, total, rtol=1e-3)
  # The plain truncation is never better on this objective.
  plain = reconstruct(*svd.exact_svd(a, rank, xp=np))
  assert np_output_sq_error(a, plain, g) >= got - 2e-3 * got - 1e-4 * total
  if damping == 0:  # Then it is the calibration inputs' own output error.
    assert np.linalg.norm(x @ (a - approx)) <= np.linalg.norm(x @ (a - plain)) * (1 + 1e-3) + 1e-4 * np.linalg.norm(x @ a)


def test_whitened_svd_with_identity_gram_is_the_plain_svd():
  a = random_spectrum_matrix(7, 5, [5.0, 3.0, 2.0, 1.0, 0.5], seed=0)
  u, s, v = svd.exact_svd(a, 3, xp=np)
  down, s_w, v_w, ok = svd.whitened_svd(a, np.eye(7, dtype=np.float32), 3, 0.0, xp=np)
  assert ok
  np.testing.assert_allclose(s_w, s, rtol=1e-5)
  signs = np.sign(np.sum(down * u, axis=0))
  np.testing.assert_allclose(down * signs, u, atol=1e-5)
  np.testing.assert_allclose(v_w * signs, v, atol=1e-5)
  # Damping scales the identity: other factors, the same truncation.
  down, s_w, v_w, _ = svd.whitened_svd(a, np.eye(7, dtype=np.float32), 3, 0.5, xp=np)
  np.testing.assert_allclose(reconstruct(down, s_w, v_w), reconstruct(u, s, v), atol=1e-5)


def test_whitened_svd_jit_matches_numpy_and_batches():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((2, 6, 4)).astype(np.float32)
  x = rng.standard_normal((2, 20, 6)).astype(np.float32)
  g = np.swapaxes(x, -1, -2) @ x
  host = svd.whitened_svd(a, g, 2, 0.01, xp=np)
  jitted = jax.jit(svd.whitened_svd, static_argnames=("rank", "xp"))(a, g, rank=2, damping=0.01)
  for i in range(2):  # Batched == one by one; jax == numpy (up to each pair's sign).
    single = svd.whitened_svd(a[i], g[i], 2, 0.01, xp=np)
    for got in (host, jitted):
      np.testing.assert_allclose(reconstruct(got[0][i], got[1][i], got[2][i]), reconstruct(*single[:3]), atol=1e-4)
  np.testing.assert_array_equal(jitted[3], [True, True])


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
def test_whitening_flags_grams_that_are_not_positive_definite(xp):
  rng = np.random.default_rng(2)
  x = rng.standard_normal((30, 5))
  dead = x.copy()
  dead[:, 2] = 0  # A dead input unit: singular X^T X.
  twin = x.copy()
  twin[:, 4] = twin[:, 1]  # Collinear inputs: singular up to rounding.
  indefinite = np.diag([1.0, 2.0, -1.0, 1.0, 1.0])
  nan = x.T @ x
  nan[0, 0] = np.nan
  grams = np.stack([x.T @ x, dead.T @ dead, twin.T @ twin, indefinite, nan]).astype(np.float32)
  # Jitted as a whole on jax (eager would compile op by op).
  whitening = svd.whitening if xp is np else jax.jit(svd.whitening, static_argnames="xp")
  whitened_svd = svd.whitened_svd if xp is np else jax.jit(svd.whitened_svd, static_argnames=("rank", "xp", "damping"))
  l, ok = whitening(grams, 0.0, xp=xp)
  np.testing.assert_array_equal(ok, [True, False, False, False, False])
  np.testing.assert_array_equal(np.asarray(l)[1:], np.broadcast_to(np.eye(5), (4, 5, 5)))
  # Undamped, whitened_svd whitens the singular and indefinite Grams by the pseudo-inverse
  # square root of their positive part (issue 26); only the non-finite one gets the plain
  # SVD. Damping makes a singular Gram definite for the Cholesky.
  a = rng.standard_normal((5, 5, 3)).astype(np.float32)
  down, s, v, ok = whitened_svd(a, grams, rank=2, damping=0.0, xp=xp)
  np.testing.assert_array_equal(ok, [True, True, True, True, False])
  np.testing.assert_allclose(reconstruct(down, s, v)[4:], reconstruct(*svd.exact_svd(a[4:], 2, xp=np)), atol=1e-5)
  np.testing.assert_array_equal(whitening(grams[:3], 0.01, xp=xp)[1], [True] * 3)


def test_start_bits_are_per_seed_and_the_same_on_every_backend():
  """Each start matrix comes from its own seed (batching does not change it); its
  signs are +-1, balanced, and unpack the same with NumPy and jax.numpy."""
  rows, k = 300, 48
  both = svd.start_bits([(1, 2, 0), (1, 2, 1)], rows, k)
  assert both.dtype == np.uint8 and both.shape == (2, svd.packed_bytes(rows, k))
  np.testing.assert_array_equal(both[1], svd.start_bits([(1, 2, 1)], rows, k)[0])
  assert not np.array_equal(both[0], both[1])
  host = svd.signs(both, rows, k, xp=np)
  assert host.shape == (2, rows, k) and set(np.unique(host)) == {-1.0, 1.0}
  assert abs(host.mean()) < 0.02
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda b: svd.signs(b, rows, k))(both)), host)
  # start_matrix: the seeds of a concrete key; a traced key draws other, valid signs.
  key = jax.random.key(3)
  first = svd.start_matrix(key, (2, rows, k), first=5)
  np.testing.assert_array_equal(first[1], svd.start_matrix(key, (1, rows, k), first=6)[0])
  traced = np.asarray(jax.jit(lambda kk: svd.start_matrix(kk, (2, rows, k)))(key))
  assert traced.shape == (2, rows, k) and set(np.unique(traced)) == {-1.0, 1.0}
  np.testing.assert_array_equal(traced, jax.jit(lambda kk: svd.start_matrix(kk, (2, rows, k)))(key))

