"""The inherited layers in NNX: the same maths as `layers.linen` (`layers.core`, `mixing`).

`InherLayer` replaces one teacher layer (`nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv`,
`nnx.Einsum`) of an NNX model: ``down`` is the teacher's own layer type into ``r``
outputs without bias (for a grouped conv: applied to each group, the groups moved to the
batch axis), ``gate`` an ``nnx.Linear(r, H)`` (absent when ``H == 1``) and ``up`` the
``H`` expert up-projections ``(H, r, prod(out))`` with biases ``(H, prod(out))`` (the
ablation variants of `InherSpec.variant`, read from the factors' shapes: no ``gate`` with
``H > 1`` mixes with fixed weights ``1/H``; a ``down`` of ``H r`` outputs is one per head); the
output is reshaped (and, for an einsum, transposed) to the teacher's output axes. The
params have the layout `inhernet_jax.inherit` produces, so `InherLayer.from_factors` takes
its factors as they are (stacked along leading layer axes for `nnx.vmap` / `nnx.scan`
stacks; inside the scan each slice is one layer). `inhernet_jax.surgery.nnx.inherit`
builds them.

Example:
    ```python
    layer = InherLayer.from_factors(teacher_linear, "dense", factors, out_shape=(64,))
    y = layer(x)   # the rank-r truncation of teacher_linear(x), for every H
    ```
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from inhernet_jax.layers import core
from inhernet_jax.layers import mixing as mixing_lib


class Experts(nnx.Module):
  """The H expert up-projections: ``kernel (H, r, n)``, ``bias (H, n)`` or None."""

  def __init__(self, kernel: jax.Array, bias: jax.Array | None):
    self.kernel = nnx.Param(kernel)
    self.bias = nnx.Param(bias) if bias is not None else None


def _down(teacher, kind: str, rank: int, rngs, equation: str | None, in_shape) -> nnx.Module:
  common = dict(use_bias=False, dtype=teacher.dtype, param_dtype=teacher.param_dtype,
                precision=teacher.precision, rngs=rngs)
  if kind == "dense":
    return nnx.Linear(teacher.in_features, rank, dot_general=teacher.dot_general, **common)
  if kind == "dense_general":
    return nnx.LinearGeneral(teacher.in_features, rank, axis=teacher.axis, **common)
  if kind == "conv":
    return nnx.Conv(
        teacher.in_features // teacher.feature_group_count, rank, teacher.kernel_size,
        teacher.strides, padding=teacher.padding, input_dilation=teacher.input_dilation,
        kernel_dilation=teacher.kernel_dilation, conv_general_dilated=teacher.conv_general_dilated,
        **common)
  common.pop("use_bias")
  return nnx.Einsum(equation, (*in_shape, rank), None, **common)


class InherLayer(nnx.Module):
  """One inherited layer: ``down``, ``gate`` (H > 1) and ``up`` (see the module docstring).

  Attributes (static):
    kind: the teacher layer's kind (``"dense"``, ``"dense_general"``, ``"conv"``,
      ``"einsum"``).
    out_shape: the teacher's output axes (their product is ``up``'s ``n``).
    out_perm: einsums: the transpose from ``(*rows, *out)`` to the teacher's output order.
    groups: a grouped conv's ``feature_group_count``.
    spatial: a conv's spatial dims (the gate pools them: one gate per sample).
    mixing: `mixing.mix` strategy.
  """

  def __init__(self, down: nnx.Module, up: Experts, gate: nnx.Linear | None, *, kind: str,
               out_shape: tuple[int, ...], out_perm: tuple[int, ...] | None = None,
               groups: int = 1, spatial: int = 0, mixing: str = "auto", dtype: Any = None,
               precision: Any = None, variant: str = "gated"):
    mixing_lib.check_strategy(mixing, "InherLayer")
    if variant == "symmetric" and groups != 1:
      raise ValueError(f"InherLayer: the symmetric variant does not support grouped convs "
                       f"(feature_group_count={groups})")
    self.variant = variant
    self.down, self.up, self.gate = down, up, gate
    self.kind, self.out_shape, self.out_perm = kind, tuple(out_shape), out_perm
    self.groups, self.spatial, self.mixing = groups, spatial, mixing
    self.dtype, self.precision = dtype, precision

  @classmethod
  def from_factors(cls, teacher: nnx.Module, kind: str, factors: dict, *,
                   out_shape: tuple[int, ...], out_perm=None, in_shape=(), equation=None,
                   mixing: str = "auto") -> InherLayer:
    """The inherited layer of ``teacher`` with `inherit`'s ``factors`` (``{"down":
    {"kernel"}, "up": {"kernel", "bias"?}, "gate"?: {"kernel", "bias"}}``, possibly
    stacked along leading layer axes) as its params."""
    width = int(factors["down"]["kernel"].shape[-1])
    heads, rank = (int(d) for d in factors["up"]["kernel"].shape[-3:-1])
    # The ablation variants, read from the factors' shapes (`InherSpec.variant`).
    variant = "symmetric" if heads > 1 and width == heads * rank else (
        "no_gate" if heads > 1 and "gate" not in factors else "gated")
    rngs = nnx.Rngs(0)  # Every value below is overwritten by a factor.
    down = _down(teacher, kind, width, rngs, equation, in_shape)
    down.kernel.set_value(jnp.asarray(factors["down"]["kernel"]))
    up = Experts(jnp.asarray(factors["up"]["kernel"]), None if "bias" not in factors["up"]
                 else jnp.asarray(factors["up"]["bias"]))
    gate = None
    if heads > 1 and variant != "no_gate":
      gate = nnx.Linear(rank, heads, dtype=teacher.dtype, param_dtype=teacher.param_dtype,
                        precision=teacher.precision, rngs=rngs)
      gate.kernel.set_value(jnp.asarray(factors["gate"]["kernel"]))
      gate.bias.set_value(jnp.asarray(factors["gate"]["bias"]))
    conv = kind == "conv"
    return cls(down, up, gate, kind=kind, out_shape=out_shape, out_perm=out_perm,
               groups=teacher.feature_group_count if conv else 1,
               spatial=len(teacher.kernel_size) if conv else 0, mixing=mixing,
               dtype=teacher.dtype, precision=teacher.precision, variant=variant)

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    """The layer on ``inputs`` (``out_sharding``, as NNX's layers take it: a sharding
    constraint on the output)."""
    per_sample = self.kind == "conv"
    x, batch = inputs, None
    if self.groups != 1:
      x, batch = core.split_groups(inputs, self.groups, self.spatial)
    z = self.down(x)
    if self.groups != 1:
      z = core.merge_groups(z, batch, self.groups)
    symmetric = self.variant == "symmetric"
    zs = core.split_heads(z, self.heads) if symmetric else None
    g = None
    if self.heads > 1:
      summary = core.gate_summary(zs.mean(axis=-2) if symmetric else z, per_sample=per_sample,
                                  spatial=self.spatial, groups=self.groups)
      g = (core.fixed_gate(summary, self.heads) if self.gate is None
           else core.gate_weights(self.gate(summary)))
    kernel = self.up.kernel[...]
    bias = self.up.bias[...] if self.up.bias is not None else None
    if symmetric:
      zs, kernel, bias, g = nnx.nn.dtypes.promote_dtype((zs, kernel, bias, g), dtype=self.dtype)
      y = core.mix_separate(zs, kernel, bias, g, per_sample=per_sample, precision=self.precision)
    else:
      z, kernel, bias, g = nnx.nn.dtypes.promote_dtype((z, kernel, bias, g), dtype=self.dtype)
      y = mixing_lib.mix(z, kernel, bias, g, per_sample=per_sample, groups=self.groups,
                         strategy=self.mixing, precision=self.precision)
    if self.kind in ("dense_general", "einsum") and len(self.out_shape) != 1:
      y = y.reshape(*y.shape[:-1], *self.out_shape)
    if self.out_perm is not None:
      y = y.transpose(self.out_perm)
    if out_sharding is not None:
      y = jax.lax.with_sharding_constraint(y, out_sharding)
    return y

  @property
  def rank(self) -> int:
    return int(self.up.kernel.shape[-2])

  @property
  def heads(self) -> int:
    return int(self.up.kernel.shape[-3])

  @property
  def features(self) -> int:
    return math.prod(self.out_shape)
