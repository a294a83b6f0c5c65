"""The inherited layers' maths, once, as functions on arrays: linen and NNX share it.

An inherited layer is ``z = down(x)`` (the teacher's own layer type into ``r``
channels), gate weights ``g = softmax(gate(summary(z)))`` (one per token for denses,
one per sample for convs, from the spatially pooled ``z``) and ``y = mix(z, up, g)``
(`inhernet_jax.layers.mixing`). The paper's ablations (`InherSpec.variant`) change two
steps: ``"no_gate"`` mixes with the fixed weights ``1/H`` (`fixed_gate`), and
``"symmetric"`` has one down-projection per head (``H r`` channels, `split_heads`), the
gate reading their mean and each head its own bottleneck (`mix_separate`). The framework
modules (`layers.linen`: ``InherDense``,
``InherConv`` and the layers `surgery` puts into a user's linen model; `layers.nnx`:
their NNX counterparts) own the parameters and the down-projection; everything between
the down-projection and the output is here.

Example:
    ```python
    x, b = core.split_groups(x, groups=2, spatial=2)      # grouped conv inputs
    z = core.merge_groups(down(x), b, groups=2)           # (batch, *spatial, G, r)
    g = core.gate_weights(core.gate_summary(z, per_sample=True, spatial=2, groups=2)
                          @ gate_kernel + gate_bias)
    y = mixing.mix(z, up_kernel, up_bias, g, per_sample=True, groups=2)
    ```
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_groups(x: jax.Array, groups: int, spatial: int) -> tuple[jax.Array, int]:
  """``(batch, *spatial, C)`` -> ``(batch * groups, *spatial, C / groups)`` and ``batch``:
  a grouped conv's groups moved to the batch axis, so one down-projection (shared by the
  groups, as `inherit` factorises the ``(*k, C / G, out)`` kernel) reads each group."""
  if x.ndim != spatial + 2 or x.shape[-1] % groups:
    raise ValueError(
        f"a factorised grouped conv (feature_group_count={groups}) needs batched inputs "
        f"(batch, *spatial, channels) with channels divisible by the groups; got {x.shape}")
  b, *dims, c = x.shape
  x = x.reshape(b, *dims, groups, c // groups)
  return jnp.moveaxis(x, -2, 1).reshape(b * groups, *dims, c // groups), b


def merge_groups(z: jax.Array, batch: int, groups: int) -> jax.Array:
  """``(batch * groups, *spatial, r)`` -> ``(batch, *spatial, groups, r)``."""
  return jnp.moveaxis(z.reshape(batch, groups, *z.shape[1:]), 1, -2)


def gate_summary(z: jax.Array, *, per_sample: bool, spatial: int = 0, groups: int = 1) -> jax.Array:
  """What the gate reads: ``z`` itself per token, or per sample its mean over the
  ``spatial`` axes (and the groups of a grouped conv)."""
  if not per_sample:
    return z
  if groups != 1:
    return z.mean(axis=tuple(range(1, z.ndim - 1)))
  return z.mean(axis=tuple(range(z.ndim - 1 - spatial, z.ndim - 1)))


def gate_weights(logits: jax.Array) -> jax.Array:
  """Softmax over the heads, in the compute dtype (no float32 island in a bf16 step): the
  mixing reads only ``g_1 .. g_{H-1}`` and gives head 0 the rest, so the weights sum to
  exactly one anyway."""
  return jax.nn.softmax(logits, axis=-1)


def gate_stats(g: jax.Array) -> dict[str, jax.Array]:
  """The batch's head load ``(H,)`` and mean gate entropy (nats) of gate weights ``g``.

  Not stop_gradient'ed, so an auxiliary loss may use them.
  """
  g = g.astype(jnp.float32)
  positions = tuple(range(g.ndim - 1))  # Samples (convs) or samples x tokens (dense).
  # xlogy: 0 log 0 = 0 for a gate weight that underflowed.
  entropy = -jnp.sum(jax.scipy.special.xlogy(g, g), axis=-1)
  return {"entropy": jnp.mean(entropy), "load": jnp.mean(g, axis=positions)}


def stacked_init(init, heads: int):
  """An initializer of ``(H, *shape)`` from one of ``shape``: H independent draws."""

  def init_fn(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, heads)
    return jnp.stack([init(k, shape[1:], dtype) for k in keys])

  return init_fn


def fixed_gate(summary: jax.Array, heads: int) -> jax.Array:
  """The ``"no_gate"`` ablation's weights: ``1/H`` for every head, shaped like the gate's
  output on ``summary`` (``(*positions, H)``), in its dtype."""
  return jnp.full((*summary.shape[:-1], heads), 1.0 / heads, summary.dtype)


def split_heads(z: jax.Array, heads: int) -> jax.Array:
  """``(..., H r)`` -> ``(..., H, r)``: the ``"symmetric"`` ablation's per-head bottlenecks."""
  if z.shape[-1] % heads:
    raise ValueError(f"a symmetric layer's bottleneck has {z.shape[-1]} channels, not a "
                     f"multiple of its {heads} heads")
  return z.reshape(*z.shape[:-1], heads, z.shape[-1] // heads)


def mix_separate(zs: jax.Array, kernel: jax.Array, bias: jax.Array | None, g: jax.Array,
                 *, per_sample: bool, precision=None) -> jax.Array:
  """``y = y_0 + sum_{h>0} g_h (y_h - y_0)`` with ``y_h = zs_h @ kernel_h + bias_h``: the
  ``"symmetric"`` ablation, each head on its own bottleneck.

  Written as head 0 plus gated differences (as `mixing.mix`), so identical heads on
  identical bottlenecks (right after `inherit`) give head 0 bit for bit.

  Args:
    zs: ``(batch, *positions, H, r)``.
    kernel: ``(H, r, n)``; bias ``(H, n)`` or None.
    g: ``(batch, H)`` when ``per_sample`` (one gate per sample), else
      ``(batch, *positions, H)``.
  """
  y = jnp.einsum("...hr,hrn->...hn", zs, kernel, precision=precision)
  if bias is not None:
    y = y + bias
  if per_sample:
    g = g.reshape(g.shape[0], *([1] * (zs.ndim - 3)), g.shape[-1])
  head0 = y[..., 0, :]
  return head0 + jnp.einsum("...h,...hn->...n", g[..., 1:], y[..., 1:, :] - head0[..., None, :],
                            precision=precision)
