"""SVD math on one weight: truncation and spectral quantities.

(A layer's exact parameter counts, and the ranks that meet an energy or a parameter
ratio, are the rank policy's: `inhernet_jax.decomposition.policy`.)

A Flax kernel of any layout is read as a matrix ``A`` of shape ``(in, out)``: every axis
but the last is an input axis (a conv kernel ``(kh, kw, C_in, C_out)`` becomes
``(kh*kw*C_in, C_out)``), and ``y = x @ A``. Its truncated SVD ``A ~ U_r S_r V_r^T`` gives
InherNet's factors: the shared down-projection ``U_r`` (orthonormal columns, ``in -> r``)
and each expert up-projection ``S_r V_r^T`` (``r -> out``). Leading "stack" axes (the
layer axis of scan-over-layers models) are batch axes: each slice is decomposed alone.

Data-aware truncation (SVD-LLM / ASVD) minimises the output error ``||X (A - A_r)||_F``
over inputs ``X`` instead of the weight error: with the (optionally damped) input Gram
``G = X^T X + damping * mean(diag) * I = Q W Q^T`` and ``W^{1/2} Q^T A = U S V^T``,
``A_r = A V_r V_r^T`` (`whitened_svd`), so the down-projection is ``A V_r S_r^{-1}``
(``G^{-1/2} U_r`` for an invertible ``G``; nothing is inverted).

Everything here is a pure function of arrays, jit-able and batched over leading axes.

Example:
  ```python
  u, s, v = truncated_svd(kernel_matrix, rank=32)
  err = eckart_young_error(s_all, 32)    # == ||A - U_r S_r V_r^T||_F
  down, s, v, ok = whitened_svd(kernel_matrix, input_gram, rank=32)   # data-aware
  ```
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inhernet_jax.decomposition.lapack import batch_sharding, host_svd, thin_svd  # noqa: F401

METHODS = ("auto", "exact", "randomized")
POWER_ITERS = 4  # Power iterations of the randomized method: the default setting.
FAST_POWER_ITERS = 2  # The documented faster setting (``InherSpec(power_iters=2)``).
DAMPING = 0.01  # Default ridge on the input Gram, relative to its mean diagonal entry.
PIVOT_TOL = 100  # A Cholesky pivot below this many eps of its Gram entry: singular.


# --------------------------------------------------------------------------- layout
def as_matrix(kernel: jax.Array, stack: int = 0) -> jax.Array:
  """Reshapes ``(*stack, *in_axes, out)`` to ``(*stack, prod(in_axes), out)``."""
  lead = kernel.shape[:stack]
  return kernel.reshape(*lead, -1, kernel.shape[-1])


def from_matrix(matrix: jax.Array, in_shape: Sequence[int]) -> jax.Array:
  """Inverse of `as_matrix` for a factor ``(*stack, prod(in_shape), k)``."""
  lead = matrix.shape[:-2]
  return matrix.reshape(*lead, *in_shape, matrix.shape[-1])


def compute_dtype() -> jnp.dtype:
  """float64 when ``jax_enable_x64`` is on, else float32: SVDs never run in bf16/f16."""
  return jnp.result_type(float)


# ------------------------------------------------------------------------ truncation
def default_oversample(rank: int, size: int | None = None) -> int:
  """Extra subspace columns of the randomized method: ``max(16, rank // 4)`` up to rank
  ``size / 8`` (``size = min(m, n)``), ``max(16, rank)`` above it.

  Measured (``python -m benchmarks.accuracy``): with ``rank // 4`` and 4 power
  iterations the error over the optimal one grows with ``rank / size`` on flat and
  slowly decaying spectra, to 1.012 at ``size / 4`` and 1.015 at ``0.4 size`` (s_i =
  i^-0.1); twice the rank in columns keeps it below 1.007 up to ``size / 4``.
  """
  if size is not None and 8 * rank > size:
    return max(16, rank)
  return max(16, rank // 4)


def width(m: int, n: int, rank: int, oversample: int | None = None) -> int:
  """Columns ``k`` of the randomized method's subspace (``rank + oversample``, capped)."""
  extra = default_oversample(rank, min(m, n)) if oversample is None else oversample
  return min(m, n, rank + extra)


def use_randomized(m: int, n: int, rank: int, oversample: int | None = None) -> bool:
  """The ``auto`` policy: randomized only when its subspace is at most half of
  ``min(m, n)`` (with the default oversampling: ``rank <= min(m, n) / 4``) and
  ``min(m, n) >= 128``; above that the exact SVD, whose accuracy the randomized method
  would need too many columns or iterations to match."""
  extra = default_oversample(rank, min(m, n)) if oversample is None else oversample
  return min(m, n) >= 128 and 2 * (rank + extra) <= min(m, n)


@functools.partial(jax.jit, static_argnames=("rank", "method", "oversample", "power_iters"))
def truncated_svd(
    a: jax.Array,
    rank: int,
    key: jax.Array | None = None,
    *,
    method: str = "auto",
    oversample: int | None = None,
    power_iters: int = POWER_ITERS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-``rank`` singular triplets of ``a`` (``(..., m, n)``), batched over ``...``.

  Computed in `compute_dtype` whatever the dtype of ``a``; returned in that dtype
  (callers cast factors back to the parameter dtype). Jit-able.

  Args:
    a: matrix or batch of matrices.
    rank: number of singular triplets, ``1 <= rank <= min(m, n)``.
    key: PRNG key of the randomized method's start matrix (`start_matrix`; a fixed
      default, so results are reproducible).
    method: ``"exact"`` (`exact_svd`), ``"randomized"`` (`randomized_svd`), or
      ``"auto"`` (randomized when `use_randomized` says the rank is well below
      ``min(m, n)``).
    oversample: extra subspace columns (default `default_oversample`).
    power_iters: power iterations of the randomized method (default `POWER_ITERS`).

  Returns:
    ``(u, s, v)`` with shapes ``(..., m, rank)``, ``(..., rank)``, ``(..., n, rank)``,
    ``s`` descending, such that ``a ~ u @ diag(s) @ v^T``.
  """
  m, n = a.shape[-2:]
  method = resolve_method(m, n, rank, method, oversample)
  if method == "exact":
    return exact_svd(a, rank)
  k = width(m, n, rank, oversample)
  start = start_matrix(jax.random.key(0) if key is None else key, (*a.shape[:-2], min(m, n), k))
  return randomized_svd(a, rank, start, power_iters)


def resolve_method(m: int, n: int, rank: int, method: str, oversample: int | None = None,
                   *, energy_target: bool = False) -> str:
  """Validates ``rank`` and ``method`` and turns ``"auto"`` into a concrete method.

  ``energy_target``: the rank was chosen from the singular values to keep a fraction of
  the energy (``InherSpec(energy=...)``); ``"auto"`` then picks the exact SVD, whose
  factors keep exactly the energy the rank was planned for (the randomized method's
  keep slightly less on flat spectra, measured 0.292 / 0.495 / 0.699 for targets 0.3 /
  0.5 / 0.7 on a 1024^2 Gaussian, and a target is a promise). The planning pass has
  computed every singular value already, so the exact SVD costs about twice that.
  """
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(m, n):
    raise ValueError(f"rank must be an int in [1, {min(m, n)}] for a {m}x{n} matrix, got {rank!r}")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method == "auto":
    if energy_target:
      return "exact"
    return "randomized" if use_randomized(m, n, rank, oversample) else "exact"
  return method


def method_and_width(m: int, n: int, rank: int, method: str, oversample: int | None = None,
                     *, energy_target: bool = False) -> tuple[str, int]:
  """`resolve_method`'s method and, for the randomized one, its subspace `width` (else 0)."""
  how = resolve_method(m, n, rank, method, oversample, energy_target=energy_target)
  return how, width(m, n, rank, oversample) if how == "randomized" else 0


def exact_svd(a: jax.Array, rank: int, *, xp=jnp):
  """Top-``rank`` triplets ``(u, s, v)`` from a full SVD (`thin_svd`), computed on ``a``
  over a power of two near ``max|a|`` (`normalize`): entries near 1e-20 or 1e20 lose
  nothing."""
  a, scale = normalize(a, xp=xp)
  u, s, vt = thin_svd(a, xp=xp)
  return u[..., :rank], s[..., :rank] * scale[..., None], xp.swapaxes(vt, -1, -2)[..., :rank]


def normalize(a: jax.Array, *, xp=jnp):
  """``(a / c, c)`` per matrix, in `compute_dtype`: ``c`` the power of two at or above
  ``max|a|`` (1 where ``a`` is zero).

  Every decomposition runs on the normalised matrix: a Gram or power iteration of a
  kernel with entries near 1e20 would overflow float32, one near 1e-20 underflow. A
  power of two divides without rounding (dividing by ``max|a|`` itself rounded every
  entry: on steep spectra, where the optimal error is a few float32 ulps of ``||A||``,
  that cost 1.0103x against 1.0087x at rank 307 of a 4096x1024 s_i = i^-3 matrix).
  """
  if xp is np:  # In place on a fresh copy, no |a| temporary: half the memory passes.
    a = np.array(a, compute_dtype())
    peak = np.maximum(a.max(axis=(-2, -1)), -a.min(axis=(-2, -1)))
    top = np.finfo(a.dtype).maxexp - 2  # 1 / c stays normal (XLA flushes subnormals).
    scale = np.ldexp(np.ones_like(peak), np.minimum(np.frexp(peak)[1], top))
    scale = np.where(peak > 0, scale, np.ones_like(scale))
    a /= scale[..., None, None]
    return a, scale
  a = a.astype(compute_dtype())
  peak = xp.max(xp.abs(a), axis=(-2, -1))
  top = np.finfo(a.dtype).maxexp - 2  # 1 / c stays normal (XLA flushes subnormals).
  scale = xp.ldexp(xp.ones_like(peak), xp.minimum(xp.frexp(peak)[1], top))
  scale = xp.where(peak > 0, scale, xp.ones_like(scale))
  return a / scale[..., None, None], scale


# Start matrices: `inhernet_jax.decomposition.starts` (re-exported here).
from inhernet_jax.decomposition.starts import (  # noqa: E402
    packed_bytes, signs, start_bits, start_matrix, start_seed, traced_start_bits)


# The randomized method (Halko, Martinsson & Tropp 2011, Alg. 4.4 with a fixed number
# of power iterations, and no convergence test: nothing leaves the device mid-way).
# The basis lives on the smaller side ``n`` of ``a`` (``M x n`` after transposing):
# ``Z`` spans ``(a^T a)^q start``; then ``a ~ (a Z) Z^T`` is truncated exactly through
# a QR of ``a Z`` and the SVD of its ``k x k`` triangle. With ``k = rank + rank/4`` and
# ``q = 4`` the error is within 1% of the optimal (Eckart-Young) one on flat (random)
# spectra and within 0.3% on decaying ones, below PiSSA's ``svd_lowrank(q=r, niter=4)``
# (measured: README, ``python -m benchmarks.engine``), with ``2q + 1`` products with
# ``a`` against PiSSA's ``2q + 2``. Products are normalised by LU (cheap, keeps the
# span, as scikit-learn does), the final basis by Householder QR.
def randomized_svd(a: jax.Array, rank: int, start: jax.Array, power_iters: int = POWER_ITERS,
                   *, xp=jnp):
  """Top-``rank`` ``(u, s, v)`` of ``a`` (``(..., m, n)``) from a start matrix.

  Args:
    a: matrix or batch of matrices (any float dtype; computed in `compute_dtype` on
      ``a / max|a|``).
    rank: ``1 <= rank <= k``.
    start: ``(..., min(m, n), k)``, e.g. `start_matrix`. The same start gives the same
      factors, up to rounding, whatever ``xp``.
    power_iters: ``q >= 0`` power iterations.
    xp: ``jax.numpy`` (jit-able, any backend) or NumPy (concrete arrays on the host,
      nothing compiled).
  """
  a, scale = normalize(a, xp=xp)
  transpose = a.shape[-2] < a.shape[-1]
  if transpose:
    a = xp.swapaxes(a, -1, -2)
  big, small = a.shape[-2:]
  at = xp.swapaxes(a, -1, -2)
  z = start.astype(a.dtype)
  for _ in range(power_iters):  # Normalised after each product: a^T a would square
    z = _lu_basis(at @ _lu_basis(a @ z, xp), xp)  # singular values below sqrt(eps) away.
  z = _qr(z, xp)[0]
  basis, tri = _qr(a @ z, xp)
  ut, s, wt = thin_svd(tri, xp=xp)
  u = basis @ ut[..., :rank]
  v = z @ xp.swapaxes(wt, -1, -2)[..., :rank]
  low = imprecise(s, rank)
  s = s[..., :rank]
  if xp is np:
    if low.any():  # The a-posteriori check: those slices by the exact SVD.
      eu, es, ev = exact_svd(a[low], rank, xp=np)
      u, s, v = u.copy(), s.copy(), v.copy()
      u[low], s[low], v[low] = eu, es, ev
  else:
    u, s, v = jax.lax.cond(
        jnp.any(low), lambda: _replace(low, (u, s, v), exact_svd(a, rank)), lambda: (u, s, v))
  s = s * scale[..., None]
  return (v, s, u) if transpose else (u, s, v)


PRECISION_TOL = 1000  # In eps of the compute dtype: see `imprecise`.


def imprecise(s, rank: int):
  """Where the randomized method cannot be trusted in the compute dtype: the first
  discarded value of its ``k`` estimated singular values ``s`` (``(..., k)``,
  descending) below `PRECISION_TOL` eps of the largest.

  Subspace iteration resolves a direction only down to about eps of the largest
  singular value: on steep spectra in float32 (s_i = i^-3, 512^2) its error grew to
  1.18x / 1.34x / 1.69x the optimum at ranks 128 / 153 / 189 (float64: 1.000); the
  check sends such matrices to the exact SVD (1.000-1.001). Measured threshold: the
  error stayed <= 1.0001x while that ratio was >= 2.8e-5 (1000 eps is 1.2e-4 in float32).
  """
  eps = np.finfo(s.dtype).eps
  nxt = s[..., min(rank, s.shape[-1] - 1)]
  return nxt < PRECISION_TOL * eps * s[..., 0]


def _replace(mask, ours, theirs):
  return tuple(jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), y, x)
               for x, y in zip(ours, theirs))


def _lu_basis(y, xp):
  """A well-conditioned basis of the span of ``y``'s columns: ``P L`` of its LU."""
  if xp is np:
    import scipy.linalg

    if y.ndim == 2:
      return scipy.linalg.lu(y, permute_l=True, check_finite=False)[0]
    return np.stack([_lu_basis(x, xp) for x in y.reshape(-1, *y.shape[-2:])]).reshape(y.shape)
  lu, _, perm = jax.lax.linalg.lu(y)  # y[perm] = L U, batched.
  k = y.shape[-1]
  lower = jnp.tril(lu[..., :, :k], -1) + jnp.eye(y.shape[-2], k, dtype=y.dtype)
  inverse = jnp.argsort(perm, axis=-1)
  return jnp.take_along_axis(lower, inverse[..., None], axis=-2)


def _qr(y, xp):
  """Reduced QR, batched (SciPy's on the host: 2x NumPy's there)."""
  if xp is np:
    import scipy.linalg

    if y.ndim == 2:
      return scipy.linalg.qr(y, mode="economic", check_finite=False)
    parts = [_qr(x, xp) for x in y.reshape(-1, *y.shape[-2:])]
    return tuple(np.stack(p).reshape(*y.shape[:-2], *p[0].shape) for p in zip(*parts))
  return jnp.linalg.qr(y)


def singular_values(a: jax.Array, *, xp=jnp) -> jax.Array:
  """All singular values of ``a`` (``(..., m, n)``), descending, in `compute_dtype`
  (computed on ``a / max|a|``: see `normalize`)."""
  a, scale = normalize(a, xp=xp)
  return xp.linalg.svd(a, compute_uv=False) * scale[..., None]


# ------------------------------------------------------------ data-aware truncation
def whitening(gram: jax.Array, damping: float = DAMPING, *, xp=jnp):
  """``(l, ok)``: the lower Cholesky factor of ``gram + damping * mean(diag) * I``.

  Batched over leading axes, in `compute_dtype`. ``ok`` (``(...,)`` bool) is False where
  the damped Gram is not numerically positive definite: the factorisation failed, is
  not finite, or a pivot is below `PIVOT_TOL` eps of its diagonal entry (an input
  feature that is a linear combination of others, up to rounding: a rank-deficient
  ``X`` without damping). There ``l`` is the identity, and `whitened_svd` (and
  `whitened_values`) whiten those slices by the damped Gram's eigendecomposition
  instead (`whitening_factor`), on every path, damped or not.
  """
  g = gram.astype(compute_dtype())
  m = g.shape[-1]
  eye = xp.eye(m, dtype=g.dtype)
  g = g + damping * xp.mean(xp.diagonal(g, axis1=-2, axis2=-1), -1)[..., None, None] * eye
  l = _cholesky(g, xp)
  pivots = xp.square(xp.diagonal(l, axis1=-2, axis2=-1))
  tol = PIVOT_TOL * np.finfo(g.dtype).eps * xp.diagonal(g, axis1=-2, axis2=-1)
  ok = xp.all(xp.isfinite(l), axis=(-2, -1)) & xp.all(pivots > tol, axis=-1)
  return xp.where(ok[..., None, None], l, eye), ok


def _cholesky(g, xp):
  if xp is not np:
    return xp.linalg.cholesky(g)  # NaNs where it fails.
  try:
    return np.linalg.cholesky(g)
  except np.linalg.LinAlgError:  # One bad slice fails the batch: NaN for the bad ones.
    flat = g.reshape(-1, *g.shape[-2:])
    out = np.full_like(flat, np.nan)
    for i, slice_ in enumerate(flat):
      try:
        out[i] = np.linalg.cholesky(slice_)
      except np.linalg.LinAlgError:
        pass
    return out.reshape(g.shape)


def whitened_svd(a: jax.Array, gram: jax.Array, rank: int, damping: float = DAMPING, *, xp=jnp):
  """Data-aware top-``rank`` factors of ``a`` (``(..., m, n)``) for inputs with Gram ``gram``.

  ``A_r = down @ diag(s) @ v^T`` minimises ``tr((A - A_r)^T G (A - A_r))`` over rank-r
  matrices, ``G`` the Gram plus the ridge ``damping * mean(diag G) * I``. With any ``F``,
  ``F^T F = G`` (`whitening_factor`: the Cholesky ``L^T`` where it holds, else ``W^{1/2}
  Q^T`` from ``G = Q W Q^T``, ``eigh``) and ``F A = U S V^T`` (exact SVD), the optimum is
  ``A_r = A V_r V_r^T``: ``v = V_r``, ``s = S_r`` and ``down = A V_r / S_r`` (which is
  ``G^{-1/2} U_r`` where ``G`` is invertible). Nothing is inverted, and a Gram the
  Cholesky rejects (a pivot below `PIVOT_TOL` eps) is factored by ``eigh``, so the
  optimum holds for any positive semi-definite ``G``: a rank-deficient ``X`` (fewer rows
  than features), and an ill-conditioned Gram in float32 (the jitted path included: the
  inverse square root this replaced lost 1.04x / 1.92x at cond(X) = 1e5 / 1e7 in
  float32, this route 1.0000 / 1.0000). Singular values below `EIGEN_TOL` eps of the
  largest count as 0 (their outputs are rounding). Slices whose Gram is not finite get
  the plain SVD (``ok`` False). The factor scales follow the Gram's: pass a per-row mean
  (``X^T X / rows``) so that ``x @ down`` has about unit second moment per component,
  whatever the number of rows. In `compute_dtype` on every path (so host, jitted and
  sharded agree). Jit-able (``rank`` and ``damping`` static).

  The damping trades optimality for conditioning: measured true output error over the
  float64 optimum, rank 24 of a 64x48 kernel, 400 rows, worst of 3 seeds
  (``python -m benchmarks.accuracy --data_aware``): ``damping=0.01``: 1.019 at cond(X) =
  1e3, 2.32 at 1e5, 8.85 at 1e7; ``damping=0``: 1.0000 at each, host and jitted (a
  float32 Gram).

  Args:
    a: matrix or batch of matrices.
    gram: ``(..., m, m)`` positive semi-definite input Gram(s), ``X^T X``.
    rank: ``1 <= rank <= min(m, n)``.
    damping: ridge ``damping * mean(diag G)`` added to the diagonal (>= 0).
    xp: array namespace, ``jax.numpy`` or NumPy (on the host).

  Returns:
    ``(down, s, v, ok)``: ``(..., m, rank)``, ``(..., rank)`` (the singular values of
    ``G^{1/2} A``), ``(..., n, rank)``, and ``ok`` (``(...,)``, False where the plain
    SVD was used).
  """
  m, n = a.shape[-2:]
  resolve_method(m, n, rank, "exact")  # Validates rank.
  f, root, ok = whitening_factor(gram, damping, xp=xp)
  a = a.astype(f.dtype)
  _, s, v = exact_svd(f @ a, rank, xp=xp)
  zero = s <= EIGEN_TOL * max(m, n) * np.finfo(f.dtype).eps * s[..., :1]
  s = xp.where(zero, 0, s)
  top = xp.where(s[..., :1] > 0, s[..., :1], 1)
  down = (a @ v) / xp.where(zero, top, s)[..., None, :]
  return down / root, s * root[..., 0], v, ok


def whitened_values(a: jax.Array, gram: jax.Array, damping: float = DAMPING, *, xp=jnp):
  """``(s, ok)``: every singular value of ``F A`` (``(..., min(m, n))``, descending),
  ``F^T F`` the damped Gram (`whitening_factor`, as `whitened_svd` whitens), so that
  ``sum_{i>r} s_i^2`` is the (damped) output error of the best data-aware rank-r
  truncation. ``ok`` False where the Gram is not finite: there the plain singular values.
  """
  f, root, ok = whitening_factor(gram, damping, xp=xp)
  return singular_values(f @ a.astype(f.dtype), xp=xp) * root[..., 0], ok


EIGEN_TOL = 1  # Singular values below this many eps * max(m, n) of the largest: zero.


def whitening_factor(gram: jax.Array, damping: float = DAMPING, *, xp=jnp):
  """``(f, root, ok)``: ``F`` with ``F^T F = G / c`` (``G`` the damped Gram, ``c`` its
  mean diagonal entry before damping; ``root = sqrt(c)``, ``(..., 1, 1)``), and ``ok``
  (``(...,)``): the Gram is finite (else ``F`` is the identity and ``root`` 1).

  ``F`` is ``L^T`` from the Cholesky where it holds (`whitening`; the same rounding on
  every path, so host, jit and sharded agree as closely as before), else ``W^{1/2} Q^T``
  from ``eigh`` (singular or ill-conditioned Grams, negative rounding clipped). Scaled
  by ``c`` (``c`` and ``sqrt(c)`` computed in the Gram's own dtype, before any cast),
  ``sqrt(c)`` folded back by the callers: a float64 Gram with entries near 1e-40 or
  1e40 neither underflows nor overflows in float32 (``sqrt(c)`` beyond float32's range,
  a Gram near 1e77, is not finite once cast: ``ok`` False).
  """
  gram_xp = np if isinstance(gram, np.ndarray) else xp
  c = gram_xp.mean(gram_xp.diagonal(gram, axis1=-2, axis2=-1), -1)
  c = gram_xp.where(c > 0, c, gram_xp.ones_like(c))[..., None, None]
  g = xp.asarray(gram / c).astype(compute_dtype())
  root = xp.asarray(gram_xp.sqrt(c)).astype(compute_dtype())  # Square root before the cast.
  ok = xp.all(xp.isfinite(g), axis=(-2, -1)) & xp.all(xp.isfinite(root), axis=(-2, -1))
  eye = xp.eye(g.shape[-1], dtype=g.dtype)
  g = xp.where(ok[..., None, None], g, eye)
  l, chol = whitening(g, damping, xp=xp)
  f = xp.swapaxes(l, -1, -2)
  if xp is np:
    if not chol.all():
      f = f.copy()
      f[~chol] = _eigen_factor(g[~chol], damping, np)
  else:
    f = jax.lax.cond(jnp.all(chol), lambda: f,
                     lambda: jnp.where(chol[..., None, None], f, _eigen_factor(g, damping, jnp)))
  f = xp.where(ok[..., None, None], f, eye)  # Not finite: the plain SVD.
  root = xp.where(ok[..., None, None], root, xp.ones_like(root))
  return f, root, ok


def _eigen_factor(g, damping, xp):
  """``W^{1/2} Q^T`` of the damped ``g = Q W Q^T`` (negative rounding clipped)."""
  eye = xp.eye(g.shape[-1], dtype=g.dtype)
  g = g + damping * xp.mean(xp.diagonal(g, axis1=-2, axis2=-1), -1)[..., None, None] * eye
  w, q = xp.linalg.eigh(g)
  return xp.sqrt(xp.maximum(w, 0))[..., :, None] * xp.swapaxes(q, -1, -2)


def canonical_signs(u, v, *, xp):
  """Flips each singular pair so that the largest-magnitude entry of its ``u`` column
  is positive (ties: positive). LAPACK builds differ in the signs they return (NumPy's
  and XLA's float32 SVDs do), so without this the host, jitted and sharded paths would
  agree only up to the sign of each (down column, up row) pair."""
  flip = -xp.min(u, axis=-2, keepdims=True) > xp.max(u, axis=-2, keepdims=True)
  sign = xp.where(flip, -1, 1).astype(u.dtype)
  return u * sign, v * sign


# --------------------------------------------------------------- spectral quantities
def _scaled(s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``s / max|s|`` and ``max|s|`` (1 where all zero): squares neither under- nor
  overflow (a 1e-30 singular value squares to 0 in float32)."""
  scale = jnp.max(jnp.abs(s), axis=-1, keepdims=True)
  scale = jnp.where(scale > 0, scale, 1)
  return s / scale, scale[..., 0]


def energy_kept(s: jax.Array, rank: int) -> jax.Array:
  """Fraction of spectral energy kept: ``sum_{i<=r} s_i^2 / sum_i s_i^2``."""
  s2 = jnp.square(_scaled(s)[0])
  total = s2.sum(-1)
  return jnp.where(total > 0, s2[..., :rank].sum(-1) / jnp.where(total > 0, total, 1), 1.0)


def eckart_young_error(s: jax.Array, rank: int) -> jax.Array:
  """``sqrt(sum_{i>r} s_i^2)``: the Frobenius error of the best rank-r approximation."""
  unit, scale = _scaled(s)
  return scale * jnp.sqrt(jnp.square(unit[..., rank:]).sum(-1))
