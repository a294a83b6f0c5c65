"""SVD math on one weight: truncation, spectral quantities, exact parameter counts.

A Flax kernel of any layout is read as a matrix ``A`` of shape ``(in, out)``: every axis
but the last is an input axis (a conv kernel ``(kh, kw, C_in, C_out)`` becomes
``(kh*kw*C_in, C_out)``), and ``y = x @ A``. Its truncated SVD ``A ~ U_r S_r V_r^T`` gives
InherNet's factors: the shared down-projection ``U_r`` (orthonormal columns, ``in -> r``)
and each expert up-projection ``S_r V_r^T`` (``r -> out``). Leading "stack" axes (the
layer axis of scan-over-layers models) are batch axes: each slice is decomposed alone.

Data-aware truncation (SVD-LLM / ASVD) minimises the output error ``||X (A - A_r)||_F``
over inputs ``X`` instead of the weight error: with the damped input Gram
``G = X^T X + damping * mean(diag) * I = L L^T`` (Cholesky) and ``L^T A = U S V^T``,
``A_r = L^{-T} U_r S_r V_r^T`` (`whitened_svd`), so the down-projection is ``L^{-T} U_r``.

Everything here is a pure function of arrays, jit-able and batched over leading axes.

Example::

  u, s, v = truncated_svd(kernel_matrix, rank=32)
  err = eckart_young_error(s_all, 32)    # == ||A - U_r S_r V_r^T||_F
  down, s, v, ok = whitened_svd(kernel_matrix, input_gram, rank=32)   # data-aware
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("auto", "exact", "randomized")
ITERS = 64  # Most power iterations of the randomized method (flat spectra need ~24).
TOL = 1e-3  # Stop when Ritz values move less than this (3e-4 on Gaussian singular values).
CHECK_EVERY = 4  # Iterations between convergence checks.
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
def use_randomized(m: int, n: int, rank: int, oversample: int | None = None) -> bool:
  """The ``auto`` policy: randomized only when ``rank`` is well below ``min(m, n)``."""
  k = rank + _oversample(rank, oversample)
  return min(m, n) >= 128 and 2 * k <= min(m, n)


def _oversample(rank: int, oversample: int | None) -> int:
  return max(rank, 16) if oversample is None else oversample


@functools.partial(jax.jit, static_argnames=("rank", "method", "oversample", "iters"))
def truncated_svd(
    a: jax.Array,
    rank: int,
    key: jax.Array | None = None,
    *,
    method: str = "auto",
    oversample: int | None = None,
    iters: int = ITERS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-``rank`` singular triplets of ``a`` (``(..., m, n)``), batched over ``...``.

  Computed in `compute_dtype` whatever the dtype of ``a``; returned in that dtype
  (callers cast factors back to the parameter dtype). Jit-able.

  Args:
    a: matrix or batch of matrices.
    rank: number of singular triplets, ``1 <= rank <= min(m, n)``.
    key: PRNG key for the randomized method (fixed default: results are reproducible).
    method: ``"exact"`` (``jnp.linalg.svd``), ``"randomized"`` (range finder + power
      iterations on the Gram matrix, a final range-finder step on ``a``), or ``"auto"`` (randomized when
      `use_randomized` says the rank is well below ``min(m, n)``).
    oversample: extra subspace columns for the randomized method (default
      ``max(rank, 16)``).
    iters: most power (subspace) iterations of the randomized method; it stops earlier
      once the Ritz values have converged (see `subspace`).

  Returns:
    ``(u, s, v)`` with shapes ``(..., m, rank)``, ``(..., rank)``, ``(..., n, rank)``,
    ``s`` descending, such that ``a ~ u @ diag(s) @ v^T``.
  """
  m, n = a.shape[-2:]
  method = resolve_method(m, n, rank, method, oversample)
  if method == "exact":
    return exact_svd(a, rank)
  k = min(m, n, rank + _oversample(rank, oversample))
  return finalize(a, subspace(gram(a), rank, key, k=k, iters=iters), rank)


def resolve_method(m: int, n: int, rank: int, method: str, oversample: int | None = None) -> str:
  """Validates ``rank`` and ``method`` and turns ``"auto"`` into a concrete method."""
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(m, n):
    raise ValueError(f"rank must be an int in [1, {min(m, n)}] for a {m}x{n} matrix, got {rank!r}")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method == "auto":
    return "randomized" if use_randomized(m, n, rank, oversample) else "exact"
  return method


def exact_svd(a: jax.Array, rank: int, *, xp=jnp):
  """Top-``rank`` triplets ``(u, s, v)`` from a full SVD (``xp.linalg.svd``)."""
  u, s, vt = xp.linalg.svd(a.astype(compute_dtype()), full_matrices=False)
  return u[..., :rank], s[..., :rank], xp.swapaxes(vt, -1, -2)[..., :rank]


# The randomized method runs in three stages so that callers decomposing many kernels
# (`inherit`) can batch the expensive middle stage over every kernel whose smaller side
# is the same, whatever the other side. Every stage takes an array namespace ``xp``:
# jax.numpy (jitted; accelerators, or inside a jit) or NumPy (concrete arrays in host
# memory: on CPU, compiling a program per shape costs more than the SVDs themselves).
#
# Why the Gram matrix: one Gram product costs m*n^2, after which every power iteration
# costs n^2*k instead of 2*m*n*k, so we afford enough iterations for flat spectra
# (random or barely trained weights), where a few iterations on `a` are off by percents.
# The Gram squares the condition number, so `finalize` ends with one step on `a` itself
# (Halko et al.'s range finder on the converged subspace): singular values come from
# `a`, not its Gram, and both factors are orthonormal even for rank-deficient `a`.
def gram(a: jax.Array, *, xp=jnp) -> jax.Array:
  """``a^T a`` or ``a a^T``, whichever is smaller, in `compute_dtype`."""
  a = a.astype(compute_dtype())
  if a.shape[-2] < a.shape[-1]:
    return a @ xp.swapaxes(a, -1, -2)
  return xp.swapaxes(a, -1, -2) @ a


def subspace(
    g: jax.Array,
    rank: int,
    key: jax.Array | None,
    k: int,
    iters: int = ITERS,
    tol: float = TOL,
    *,
    xp=jnp,
) -> jax.Array:
  """An orthonormal ``n x k`` basis of the top eigenspace of PSD ``g`` (``(..., n, n)``).

  A random start, multiplications by ``g`` with re-orthonormalisation (the range finder
  with power iterations) until the top-``rank`` Ritz values move by less than ``tol``
  (relative) over `CHECK_EVERY` iterations, or ``iters`` iterations. Decaying spectra
  (trained weights) stop after a few iterations; flat ones (random weights) need most.

  With ``xp=numpy`` it runs on the host with a NumPy start drawn from ``key``
  (no compile); otherwise it is one jitted program.
  """
  if xp is np:
    if key is None:
      key = jax.random.key(0)
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng([int(w) for w in np.ravel(data)])
    start = rng.standard_normal((*g.shape[:-2], g.shape[-1], k)).astype(g.dtype)
    return _subspace(g, start, rank, iters, tol, np, _host_while, lambda y: np.linalg.qr(y)[0])
  return _subspace_jit(g, rank, key, k, iters, tol)


@functools.partial(jax.jit, static_argnames=("rank", "k", "iters", "tol"))
def _subspace_jit(g, rank, key, k, iters, tol):
  if key is None:
    key = jax.random.key(0)
  start = jax.random.normal(key, (*g.shape[:-2], g.shape[-1], k), g.dtype)
  return _subspace(g, start, rank, iters, tol, jnp, jax.lax.while_loop, _householder_q)


def _host_while(cond, body, state):
  while cond(state):
    state = body(state)
  return state


def _householder_q(y):
  return jnp.linalg.qr(y)[0]


def _subspace(g, q, rank, iters, tol, xp, while_loop, orthonormalize):
  k = q.shape[-1]
  q = orthonormalize(q)

  def ritz(q):
    w = xp.linalg.eigvalsh(xp.swapaxes(q, -1, -2) @ g @ q)[..., k - rank :]
    # Eigenvalues at the Gram's rounding level never settle and need not: `finalize`
    # resolves them on `a` itself.
    floor = 100 * np.finfo(g.dtype).eps * w[..., -1:]
    return w, xp.maximum(xp.abs(w), floor)

  def body(state):
    i, q, w, _ = state
    for _ in range(CHECK_EVERY):
      q = orthonormalize(g @ q)
    w_new, scale = ritz(q)
    return i + CHECK_EVERY, q, w_new, xp.max(xp.abs(w_new - w) / scale)

  def cond(state):
    i, _, _, change = state
    return (i < iters) & (change > tol)

  state = (0, q, ritz(q)[0], xp.asarray(np.inf, g.dtype))
  return while_loop(cond, body, state)[1]


def finalize(a: jax.Array, q: jax.Array, rank: int, *, xp=jnp):
  """``(u, s, v)`` of ``a`` from a basis ``q`` of its Gram's top eigenspace.

  ``q`` lives on `gram`'s (smaller) side. One range-finder step on ``a``: ``y = a q``,
  ``Q = qr(y)``, ``B = Q^T a``, ``svd(B)``.
  """
  a = a.astype(compute_dtype())
  transpose = a.shape[-2] < a.shape[-1]
  if transpose:
    a = xp.swapaxes(a, -1, -2)
  basis = xp.linalg.qr(a @ q)[0]
  ub, s, vt = xp.linalg.svd(xp.swapaxes(basis, -1, -2) @ a, full_matrices=False)
  u, v = basis @ ub[..., :rank], xp.swapaxes(vt, -1, -2)[..., :rank]
  return (v, s[..., :rank], u) if transpose else (u, s[..., :rank], v)


def singular_values(a: jax.Array, *, xp=jnp) -> jax.Array:
  """All singular values of ``a`` (``(..., m, n)``), descending, in `compute_dtype`."""
  return xp.linalg.svd(a.astype(compute_dtype()), compute_uv=False)


# ------------------------------------------------------------ data-aware truncation
def whitening(gram: jax.Array, damping: float = DAMPING, *, xp=jnp):
  """``(l, ok)``: the lower Cholesky factor of ``gram + damping * mean(diag) * I``.

  Batched over leading axes, in `compute_dtype`. ``ok`` (``(...,)`` bool) is False where
  the damped Gram is not numerically positive definite: the factorisation failed, is
  not finite, or a pivot is below `PIVOT_TOL` eps of its diagonal entry (an input
  feature that is a linear combination of others, up to rounding: a rank-deficient
  ``X`` without damping). There ``l`` is the identity: whitening is skipped and
  `whitened_svd` is the plain SVD.
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
  matrices, ``G`` the damped Gram (see `whitening`): ``L^T A = U S V^T`` (exact SVD),
  ``down = L^{-T} U_r`` (a solve). Slices whose Gram fails `whitening` get the plain
  SVD. The factor scales follow the Gram's: pass a per-row mean (``X^T X / rows``) so
  that ``x @ down`` has about unit second moment per component (at most one, damped),
  whatever the number of rows. Jit-able (``rank`` static).

  Args:
    a: matrix or batch of matrices.
    gram: ``(..., m, m)`` positive semi-definite input Gram(s), ``X^T X``.
    rank: ``1 <= rank <= min(m, n)``.
    damping: ridge ``damping * mean(diag G)`` added to the diagonal (>= 0).
    xp: array namespace, ``jax.numpy`` or NumPy (on the host).

  Returns:
    ``(down, s, v, ok)``: ``(..., m, rank)``, ``(..., rank)`` (the singular values of
    ``L^T A``), ``(..., n, rank)``, and ``ok`` (``(...,)``, False where the plain SVD
    was used).
  """
  m, n = a.shape[-2:]
  resolve_method(m, n, rank, "exact")  # Validates rank.
  l, ok = whitening(gram, damping, xp=xp)
  lt = xp.swapaxes(l, -1, -2)
  u, s, v = exact_svd(lt @ a.astype(l.dtype), rank, xp=xp)
  return xp.linalg.solve(lt, u), s, v, ok


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


def rank_for_energy(s: Sequence[float] | np.ndarray, energy: float) -> int:
  """Smallest rank whose kept energy is at least ``energy`` (in (0, 1])."""
  s2 = np.square(np.asarray(s, np.float64))
  total = s2.sum()
  if total == 0:
    return 1
  cum = np.cumsum(s2) / total
  # A tolerance so that energy=1.0 is met despite rounding of the cumulative sum.
  return int(min(len(s2), np.searchsorted(cum, energy - 1e-12) + 1))


def dense_params(m: int, n: int, use_bias: bool = True) -> int:
  """Parameters of the teacher layer with an ``m x n`` matrix."""
  return m * n + (n if use_bias else 0)


def inherited_params(m: int, n: int, rank: int, heads: int = 1, use_bias: bool = True) -> int:
  """Exact parameters of the factorised layer.

  Shared down-projection ``m*r`` (no bias), ``heads`` up-projections ``r*n`` (+ ``n`` bias
  each), and for ``heads > 1`` a gate Dense ``r -> heads`` with bias. With one head the
  gate would be a constant softmax over one logit, so there is none.
  """
  gate = rank * heads + heads if heads > 1 else 0
  return m * rank + heads * (rank * n + (n if use_bias else 0)) + gate


def compression_ratio(m: int, n: int, rank: int, heads: int = 1, use_bias: bool = True) -> float:
  """Teacher parameters over inherited parameters of one layer (> 1 means smaller)."""
  return dense_params(m, n, use_bias) / inherited_params(m, n, rank, heads, use_bias)


def rank_for_param_ratio(
    m: int, n: int, ratio: float, heads: int = 1, use_bias: bool = True
) -> int:
  """Largest rank whose layer has at most ``ratio`` times the teacher's parameters.

  Returns 0 when even rank 1 exceeds the budget.
  """
  budget = ratio * dense_params(m, n, use_bias)
  fixed = heads * (n if use_bias else 0)
  per_rank = m + heads * n + (heads if heads > 1 else 0)
  extra = heads if heads > 1 else 0  # gate bias
  r = math.floor((budget - fixed - extra) / per_rank)
  return int(max(0, min(r, min(m, n))))
