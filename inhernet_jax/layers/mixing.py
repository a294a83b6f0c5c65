"""How an inherited layer mixes its H expert up-projections: in weight or in output space.

A factorised layer computes ``y = sum_h g_h (z @ up_h + b_h)`` from its bottleneck ``z``
(``r`` channels) and gate weights ``g`` (one per sample for convs, one per token for
denses). Both strategies below write it as head 0 plus the gated differences of the
other heads, ``y = z @ up_0 + sum_{h>0} g_h z @ (up_h - up_0)`` (bias alike), so that the
gate weights sum to exactly one in any compute dtype and identical heads (right after
`inhernet_jax.inherit`) give head 0 bit for bit, whatever the gate:

* ``"weights"``: mix before the contraction. One gate per sample: each sample's
  ``(r, out)`` kernel ``up_0 + sum g_h (up_h - up_0)`` is materialised, then one batched
  contraction (``P`` positions per sample). One gate per token: the gates scale the
  bottleneck, ``[z, g_1 z, ..., g_{H-1} z] @ [up_0; up_1 - up_0; ...]``, one GEMM over
  ``H r`` inputs (the per-token form of weight mixing: no per-token kernel is built).
* ``"outputs"``: one GEMM (or batched conv-as-GEMM) of the bottleneck against all heads'
  kernels side by side, ``(r, H out)``, then a gate-weighted sum of the ``H`` outputs
  (XLA fuses it into the GEMM's consumer).

Both have the same parameters; they differ in FLOPs and memory traffic (`costs`), and
`choose` picks one from the shapes and the backend (``"auto"``).

Example:
  ```python
  y = mix(z, kernel, bias, g, per_sample=True, strategy="auto")
  choose(batch=256, positions=16, rank=128, features=512, heads=2, itemsize=2,
         per_sample=True, backend="gpu")          # "outputs"
  ```
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

STRATEGIES = ("auto", "weights", "outputs")

# What one byte of memory traffic costs in FLOPs: a device's peak matmul rate over its
# memory bandwidth. GPUs and TPUs run GEMMs far faster than they move data (H100 bf16:
# ~990 TFLOP/s over 3.35 TB/s, ~300; TPU v5e: 197 TFLOP/s over 0.82 TB/s, ~240), so
# there the strategy that moves fewer bytes wins even with more FLOPs; a 2-core CPU
# (~100 GFLOP/s, ~20 GB/s) is nearly FLOP-bound. Unknown backends count as GPUs.
FLOPS_PER_BYTE = {"cpu": 5.0, "gpu": 300.0, "tpu": 250.0}


def costs(*, batch: int, positions: int, rank: int, features: int, heads: int, itemsize: int,
          per_sample: bool) -> dict[str, tuple[float, float]]:
  """``{strategy: (FLOPs, bytes of intermediates)}`` of mixing one layer's heads.

  Counts what differs between the strategies (the bottleneck ``z`` and the output ``y``
  are read and written by both): the forward pass; the backward pass scales alike.

  Args:
    batch: samples ``B`` (one gate each when ``per_sample``).
    positions: positions ``P`` per sample (spatial positions of a conv's output, tokens).
    rank: bottleneck channels ``r`` (per group for grouped convs).
    features: output channels ``n`` (all groups together).
    heads: experts ``H``.
    itemsize: bytes per element of the compute dtype.
    per_sample: one gate per sample (convs) or per position (denses).
  """
  b, p, r, n, h = batch, positions, rank, features, heads
  gemm = 2.0 * b * p * r * n  # One head's contraction.
  outputs = (h * gemm + 2.0 * b * p * n * (h - 1),  # All heads' outputs, weighted sum.
             2.0 * b * p * h * n * itemsize)  # ... written, then read by the sum.
  if per_sample:
    weights = (gemm + 2.0 * b * r * n * (h - 1),  # Per-sample kernels, then one contraction.
               2.0 * b * r * n * itemsize)  # ... each written, then read.
  else:
    weights = (h * gemm + 1.0 * b * p * r * (h - 1),  # Gate-scaled bottleneck, one GEMM.
               2.0 * b * p * h * r * itemsize)  # ... written, then read.
  return {"weights": weights, "outputs": outputs}


def choose(*, batch: int, positions: int, rank: int, features: int, heads: int, itemsize: int,
           per_sample: bool, backend: str | None = None) -> str:
  """The cheaper strategy, ``"weights"`` or ``"outputs"``, for these shapes on ``backend``.

  The rule: minimise ``FLOPs + FLOPS_PER_BYTE[backend] * bytes`` (`costs`), ties to
  ``"weights"``. In practice, one gate per sample: on a CPU (FLOP-bound) weight mixing
  almost always wins (``P + H - 1`` against ``P H`` contractions per sample); on a
  GPU/TPU (bandwidth-bound) output mixing wins once ``P H < r`` (the late, small-spatial
  stages of a CNN, where the per-sample kernels outweigh the activations). One gate per
  token: both do the same GEMM FLOPs; the bottleneck form moves ``H r`` per token
  against ``H n`` for the outputs, so weights unless ``r > n``.

  Args:
    backend: ``"cpu"``, ``"gpu"``, ``"tpu"``; default `jax.default_backend()` (at trace
      time, so a jitted function specialises to the backend it runs on).

  The other arguments are those of `costs`.
  """
  if heads == 1:
    return "weights"  # Nothing to mix; both compute z @ up_0.
  backend = backend or jax.default_backend()
  per_byte = FLOPS_PER_BYTE.get(backend, FLOPS_PER_BYTE["gpu"])
  c = costs(batch=batch, positions=positions, rank=rank, features=features, heads=heads,
            itemsize=itemsize, per_sample=per_sample)
  score = {k: flops + per_byte * nbytes for k, (flops, nbytes) in c.items()}
  return "outputs" if score["outputs"] < score["weights"] else "weights"


def check_strategy(strategy: str, where: str) -> str:
  if strategy not in STRATEGIES:
    raise ValueError(f"{where}: mixing must be one of {STRATEGIES}, got {strategy!r}")
  return strategy


def _weighted_sum(y_all: jax.Array, g: jax.Array) -> jax.Array:
  """``y_all[..., 0, :] + sum_{h>0} g_h y_all[..., h, :]`` (``g``: ``(..., H - 1)``,
  broadcastable to ``y_all``'s leading axes)."""
  return y_all[..., 0, :] + jnp.sum(g[..., None] * y_all[..., 1:, :], axis=-2)


def mix(z: jax.Array, kernel: jax.Array, bias: jax.Array | None, g: jax.Array | None, *,
        per_sample: bool, groups: int = 1, strategy: str = "auto", precision=None,
        backend: str | None = None) -> jax.Array:
  """``sum_h g_h (z @ kernel[h] + bias[h])`` as head 0 plus gated differences.

  Args:
    z: bottleneck ``(*batch, *positions, r)``; ``(batch, *positions, groups, r)`` for a
      grouped conv (group ``i``'s outputs read group ``i``'s ``r`` channels).
    kernel: ``(H, r, out)`` (read as ``(H, r, groups, out / groups)`` when grouped).
    bias: ``(H, out)`` or None.
    g: gate weights, ``(*batch, H)`` when ``per_sample`` else ``(*batch, *positions,
      H)``; None when ``H == 1``. Only ``g[..., 1:]`` is read.
    per_sample: one gate per sample (convs) or per position (denses).
    groups: the conv's ``feature_group_count``.
    strategy: ``"weights"``, ``"outputs"`` or ``"auto"`` (`choose`).
    precision: of the contractions.
    backend: for ``"auto"``; default `jax.default_backend()`.

  Returns:
    ``(*batch, *positions, out)``.
  """
  heads, r, features = kernel.shape
  shape = (*z.shape[:-2], features) if groups > 1 else (*z.shape[:-1], features)
  if groups > 1:
    kernel = kernel.reshape(heads, r, groups, features // groups)
  if g is None or heads == 1:
    if groups > 1:
      y = jnp.einsum("...gr,rgp->...gp", z, kernel[0], precision=precision).reshape(shape)
    else:
      y = jnp.einsum("...r,rn->...n", z, kernel[0], precision=precision)
    return y + bias[0] if bias is not None else y
  g = g[..., 1:]
  batch = g.shape[:-1] if per_sample else ()
  if strategy == "auto":
    strategy = choose(
        batch=math.prod(g.shape[:-1]),
        positions=math.prod(shape[len(g.shape) - 1:-1]) if per_sample else 1,
        rank=r, features=features, heads=heads, itemsize=jnp.dtype(z.dtype).itemsize,
        per_sample=per_sample, backend=backend)
  check_strategy(strategy, "mix")
  deltas = kernel[1:] - kernel[:1]
  if strategy == "outputs" or not per_sample:  # Head 0 and the differences side by side.
    stacked = jnp.concatenate([kernel[:1], deltas])
  if per_sample:
    # Gates broadcast over positions (and groups): (*batch, 1, ..., 1, H - 1).
    gb = g.reshape(*batch, *([1] * (len(shape) - 1 - len(batch) + (groups > 1))), heads - 1)
  else:
    gb = g[..., None, :] if groups > 1 else g
  if strategy == "outputs":
    if groups > 1:
      y_all = jnp.einsum("...gr,hrgp->...ghp", z, stacked, precision=precision)
      y = _weighted_sum(y_all, gb).reshape(shape)
    else:
      flat = jnp.moveaxis(stacked, 0, 1).reshape(r, heads * features)  # (r, H out)
      y_all = jnp.dot(z, flat, precision=precision).reshape(*z.shape[:-1], heads, features)
      y = _weighted_sum(y_all, gb)
  elif per_sample:
    if groups > 1:
      mixed = kernel[0] + jnp.einsum("bh,hrgp->brgp", g, deltas, precision=precision)
      zs = z.reshape(z.shape[0], -1, groups, r)
      y = jnp.einsum("bxgr,brgp->bxgp", zs, mixed, precision=precision).reshape(shape)
    else:
      mixed = kernel[0] + jnp.einsum("...h,hrn->...rn", g, deltas, precision=precision)
      zs = z.reshape(*batch, -1, r)
      y = jnp.einsum("...pr,...rn->...pn", zs, mixed, precision=precision).reshape(shape)
  else:
    if groups > 1:
      raise ValueError("mix: grouped layers have one gate per sample (per_sample=True)")
    # Gates folded into the bottleneck, one contraction over (heads x rank).
    zg = jnp.concatenate([z, (g[..., :, None] * z[..., None, :]).reshape(*z.shape[:-1], -1)], -1)
    y = jnp.dot(zg, stacked.reshape(heads * r, features), precision=precision)
  if bias is not None:
    b = bias[0] + g @ (bias[1:] - bias[:1])  # Per sample or per position.
    if per_sample:
      b = b.reshape(*batch, *([1] * (len(shape) - 1 - len(batch))), features)
    y = y + b
  return y
