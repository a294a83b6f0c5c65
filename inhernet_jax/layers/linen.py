"""InherNet layers: drop-in `nn.Dense` / `nn.Conv` with an asymmetric gated factorisation.

Without a spec (or where the spec keeps the layer) `InherDense` and `InherConv` *are*
`nn.Dense` / `nn.Conv`: same fields, same parameters, so teacher checkpoints load. With a
spec that factorises the layer they compute:

```text
z = down(x)                       # shared compressor in -> r (a kh x kw conv for convs)
g = softmax(gate(z))              # H gate weights: per token (Dense), per sample (Conv,
                                  # from the global-average-pooled z)
y = sum_h g_h * (z @ up_h + b_h)  # H expert up-projections r -> out (1x1 for convs)
```

with parameters ``{"down": {"kernel"}, "up": {"kernel": (H, r, out), "bias": (H, out)},
"gate": {"kernel": (r, H), "bias": (H,)}}`` (no gate when ``H == 1``). The spec's
``variant`` builds the paper's ablations: ``"no_gate"`` (fixed weights ``1/H``, no gate
params) and ``"symmetric"`` (``down`` has ``H r`` outputs, one ``r``-block per head). After
`inhernet_jax.inherit` every head is ``S_r V_r^T`` and the gate weights sum to one, so the
layer computes exactly the rank-r truncation of the teacher, for every H. (The public
demo initialises each head to ``U_r S_r / H``, which scales the layer by ``1/H``; we do
not.)

The heads are mixed as head 0 plus the gated differences of the others
(`inhernet_jax.layers.mixing`), in weight space or in output space (the layers' ``mixing``
field; ``"auto"`` picks by shapes and backend), with the gate softmax in the compute
dtype. `fold` folds one-head layers into single kernels for serving.

Gated layers (``H > 1``) also record cheap gate statistics when the caller asks for the
``"intermediates"`` collection (and cost nothing otherwise): the mean gate weight per head
(the head *load*) and the mean entropy of the gate distribution. `gate_stats` turns them
into one entry per layer.

Example:
  ```python
  conv = InherConv(64, (3, 3), spec=InherSpec(rank=16, heads=3))
  variables = conv.init(key, x)
  y, state = conv.apply(variables, x, mutable=["intermediates"])
  gate_stats(state["intermediates"])   # {"": {"entropy": 0.9, "load": [...], ...}}
  ```
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from inhernet_jax.layers import core
from inhernet_jax.layers import mixing as mixing_lib
from inhernet_jax.decomposition.assemble import gate_kernel_init
from inhernet_jax.decomposition.policy import LayerPlan, layer_plan
from inhernet_jax.decomposition.spec import InherSpec



def _plan(module: nn.Module, m: int, n: int) -> LayerPlan | None:
  """The spec's plan for ``module``'s kernel, or None when there is no spec."""
  mixing_lib.check_strategy(module.mixing, f"{type(module).__name__} {'/'.join(module.path)!r}")
  if module.spec is None:
    return None
  if not isinstance(module.spec, InherSpec):
    raise TypeError(f"{type(module).__name__}.spec must be an InherSpec or None, got {module.spec!r}")
  path = "/".join(str(p) for p in (*module.path, "kernel"))
  return layer_plan(module.spec, path, m, n, module.use_bias)


class _Experts(nn.Module):
  """H up-projections ``r -> out`` mixed by gate weights ``g``."""

  heads: int
  features: int
  use_bias: bool
  dtype: Any
  param_dtype: Any
  precision: Any
  kernel_init: Any
  bias_init: Any
  mixing: str = "auto"

  def _stacked(self, name, init, shape):
    return self.param(name, core.stacked_init(init, self.heads), (self.heads, *shape),
                      self.param_dtype)

  @nn.compact
  def __call__(self, z: jax.Array, g: jax.Array | None, per_sample: bool, groups: int = 1,
               separate: bool = False) -> jax.Array:
    """Mixes the experts (`mixing.mix`: head 0 plus the gated differences of the others).

    Args:
      z: bottleneck ``(*batch, *positions, r)``; ``(batch, *positions, groups, r)`` for a
        grouped conv.
      g: gate weights ``(*batch, H)`` when ``per_sample`` else ``(*batch, *positions, H)``;
        None when ``H == 1``.
      per_sample: one gate per sample (convs) or per position (dense/token).
      groups: the conv's ``feature_group_count``: group ``i``'s outputs read only group
        ``i``'s ``r`` bottleneck channels.
      separate: ``z`` is ``(..., H, r)``, one bottleneck per head (the symmetric variant,
        `core.mix_separate`).
    """
    r = z.shape[-1]
    kernel = self._stacked("kernel", self.kernel_init, (r, self.features))
    bias = self._stacked("bias", self.bias_init, (self.features,)) if self.use_bias else None
    z, kernel, bias, g = nn.dtypes.promote_dtype(z, kernel, bias, g, dtype=self.dtype)
    if separate:
      return core.mix_separate(z, kernel, bias, g, per_sample=per_sample,
                               precision=self.precision)
    return mixing_lib.mix(z, kernel, bias, g, per_sample=per_sample, groups=groups,
                      strategy=self.mixing, precision=self.precision)


def _down(module, layer_cls, rank: int, **layout) -> nn.Module:
  """The shared compressor: the teacher's own layer type with ``rank`` outputs, no bias."""
  return layer_cls(
      rank,
      use_bias=False,
      dtype=module.dtype,
      param_dtype=module.param_dtype,
      precision=module.precision,
      kernel_init=module.kernel_init,
      name="down",
      **layout,
  )


def _gate(module, z_summary: jax.Array, heads: int) -> jax.Array:
  logits = nn.Dense(
      heads,
      dtype=module.dtype,
      param_dtype=module.param_dtype,
      precision=module.precision,
      kernel_init=gate_kernel_init,
      name="gate",
  )(z_summary)
  return core.gate_weights(logits)


# Name of the gate statistics in the "intermediates" collection, next to the layer's
# submodules: ``{..., "query": {"gate_stats": ({"entropy": (), "load": (H,)},)}}``.
GATE_STATS = "gate_stats"


def _sow_gate_stats(module: nn.Module, g: jax.Array) -> None:
  """Sows the batch's head load ``(H,)`` and mean gate entropy (nats) of gates ``g``."""
  # Checked first so that a plain apply traces no extra ops at all (sow itself would only
  # drop the value after it has been computed).
  if not module.is_mutable_collection("intermediates"):
    return
  module.sow("intermediates", GATE_STATS, core.gate_stats(g))


def _experts(module, plan: LayerPlan, mixing: str, features: int | None = None) -> _Experts:
  return _Experts(
      heads=plan.heads,
      features=module.features if features is None else features,
      use_bias=module.use_bias,
      dtype=module.dtype,
      param_dtype=module.param_dtype,
      precision=module.precision,
      kernel_init=module.kernel_init,
      bias_init=module.bias_init,
      mixing=mixing,
      name="up",
  )


class InherDense(nn.Dense):
  """`nn.Dense` that factorises itself when ``spec`` says so (one gate per token).

  Attributes:
    spec: an `InherSpec`, or None for a plain `nn.Dense`.
    mixing: how the heads are mixed, ``"weights"`` (gates scale the bottleneck, one GEMM
      over ``H r`` inputs), ``"outputs"`` (one GEMM over all heads' up-projections, then
      a gate-weighted sum) or ``"auto"`` (`mixing.choose`: by shapes and backend). Same
      parameters and outputs either way.
  """

  spec: InherSpec | None = None
  mixing: str = "auto"

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    plan = _plan(self, inputs.shape[-1], self.features)
    if plan is None or not plan.factorize:
      return super().__call__(inputs)
    return factorised_dense(self, inputs, plan, self.mixing)


class InherConv(nn.Conv):
  """`nn.Conv` that factorises itself when ``spec`` says so (one gate per sample).

  The down-projection is a conv with the teacher's kernel size, strides, padding and
  dilations into ``r`` channels; the experts are 1x1 convs (stored as ``(H, r, out)``).

  Grouped convs (``feature_group_count = G``, depthwise included) follow the plan
  `inherit` makes from their kernel ``(*k, in / G, out)``, one ``(prod(k) * in / G) x out``
  matrix: the down-projection (``(*k, in / G, r)``) is shared by the groups and applied to
  each group's inputs, and group ``i``'s outputs mix group ``i``'s ``r`` channels (the
  ``(H, r, out)`` experts read as ``(H, r, G, out / G)``), which is exactly the rank-r
  truncation of that matrix. It saves parameters but computes ``G * r`` bottleneck
  channels: the model zoo keeps depthwise convs (`models.preset`).

  Attributes:
    spec: an `InherSpec`, or None for a plain `nn.Conv`.
    mixing: how the heads are mixed, ``"weights"`` (one ``(r, out)`` kernel per sample,
      then one contraction), ``"outputs"`` (one GEMM over all heads' 1x1 convs, then a
      gate-weighted sum) or ``"auto"`` (`mixing.choose`: by shapes and backend). Same
      parameters and outputs either way.
  """

  spec: InherSpec | None = None
  mixing: str = "auto"

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel_size = (
        (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    )
    # The kernel's matrix view, as `inherit` sees it: (*k, in / groups) x out.
    in_per_group = inputs.shape[-1] // self.feature_group_count
    plan = _plan(self, math.prod(kernel_size) * in_per_group, self.features)
    if plan is None or not plan.factorize:
      return super().__call__(inputs)
    return factorised_conv(self, inputs, plan, self.mixing)


# ------------------------------------------------- the factorised computations
# Called inside a compact method of ``module`` (an `nn.Dense` / `nn.Conv`, the
# package's layers or a user's own, intercepted by `inhernet_jax.surgery.linen`): the
# factor params are its submodules ``down``, ``up`` and ``gate``.
def down_width(plan: LayerPlan) -> int:
  """The down-projection's outputs: ``r``, or ``H r`` for the symmetric variant."""
  return plan.rank * (plan.heads if plan.variant == "symmetric" else 1)


def _mix(module, z: jax.Array, plan: LayerPlan, mixing: str, *, per_sample: bool,
         spatial: int = 0, groups: int = 1, features: int | None = None) -> jax.Array:
  """Gate and experts from the bottleneck ``z`` for every variant of ``plan``."""
  symmetric = plan.variant == "symmetric" and plan.heads > 1
  if symmetric and groups != 1:
    raise ValueError(f"{'/'.join(module.path)}: the symmetric variant does not support "
                     f"grouped convs (feature_group_count={groups})")
  zs = core.split_heads(z, plan.heads) if symmetric else None
  g = None
  if plan.heads > 1:
    summary = core.gate_summary(zs.mean(axis=-2) if symmetric else z, per_sample=per_sample,
                                spatial=spatial, groups=groups)
    if plan.variant == "no_gate":
      g = core.fixed_gate(summary, plan.heads)
    else:
      g = _gate(module, summary, plan.heads)
      _sow_gate_stats(module, g)
  experts = _experts(module, plan, mixing, features)
  if not symmetric:
    return experts(z, g, per_sample=per_sample, groups=groups)
  return experts(zs, g, per_sample=per_sample, separate=True)


def factorised_dense(module: nn.Module, inputs: jax.Array, plan: LayerPlan,
                     mixing: str = "auto") -> jax.Array:
  """The factorised `nn.Dense` ``module`` (one gate per token) of ``plan``."""
  z = _down(
      module, nn.Dense, down_width(plan), dot_general=module.dot_general,
      dot_general_cls=module.dot_general_cls,
  )(inputs)
  return gated_experts(module, z, plan, mixing)


def gated_experts(module: nn.Module, z: jax.Array, plan: LayerPlan, mixing: str,
                  features: int | None = None) -> jax.Array:
  """Gate (per token) and experts of a dense-like layer from its bottleneck ``z``."""
  return _mix(module, z, plan, mixing, per_sample=False, features=features)


def factorised_conv(module: nn.Module, inputs: jax.Array, plan: LayerPlan,
                    mixing: str = "auto") -> jax.Array:
  """The factorised `nn.Conv` ``module`` (one gate per sample) of ``plan``."""
  kernel_size = (
      (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
  )
  where = "/".join(module.path)
  if module.mask is not None:
    raise ValueError(f"{where}: masked convs cannot be factorised")
  groups = module.feature_group_count
  x, b = inputs, None
  if groups != 1:
    try:
      x, b = core.split_groups(inputs, groups, len(kernel_size))
      if module.features % groups:
        raise ValueError(f"a factorised grouped conv (feature_group_count={groups}) needs "
                         f"features divisible by the groups; got {module.features}")
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
  z = _down(
      module, nn.Conv, down_width(plan), kernel_size=kernel_size, strides=module.strides,
      padding=module.padding, input_dilation=module.input_dilation,
      kernel_dilation=module.kernel_dilation, conv_general_dilated=module.conv_general_dilated,
      conv_general_dilated_cls=module.conv_general_dilated_cls,
  )(x)
  if groups != 1:
    z = core.merge_groups(z, b, groups)  # (batch, *spatial', groups, r)
  return _mix(module, z, plan, mixing, per_sample=True, spatial=len(kernel_size), groups=groups)


# --------------------------------------------------------------------- gate statistics
def gate_arrays(intermediates: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
  """The sown gate statistics as flat arrays, one entry per gated layer (jit-friendly).

  Example:
    ```python
    _, state = model.apply(variables, x, mutable=["intermediates"])
    arrays = gate_arrays(state["intermediates"])   # inside jit, if you like
    stats = gate_stats_from_arrays(jax.device_get(arrays))
    ```

  Args:
    intermediates: the ``"intermediates"`` collection of ``model.apply(...,
      mutable=["intermediates"])`` (or the whole mutated-state dict holding it). Other
      sown values and ``capture_intermediates`` outputs are ignored.

  Returns:
    ``{layer path: {"entropy": (*L,), "load": (*L, H)}}``, float32, with ``/``-joined
    module paths (``"block_0/attn/query"``). ``L`` are the layer axes of `nn.scan` stacks
    (``(depth,)`` for ``"blocks/mlp/fc1"``), empty otherwise. A layer called several
    times in one apply gets the mean over its calls.
  """
  if set(intermediates) == {"intermediates"}:
    intermediates = intermediates["intermediates"]
  out = {}

  def visit(node, path):
    for key, value in node.items():
      calls = value if isinstance(value, (tuple, list)) else (value,)  # sow's tuple
      if key == GATE_STATS and all(isinstance(c, Mapping) and "load" in c for c in calls):
        out["/".join(path)] = {
            k: jnp.mean(jnp.stack([jnp.asarray(c[k], jnp.float32) for c in calls]), axis=0)
            for k in ("entropy", "load")
        }
      elif isinstance(value, Mapping):
        visit(value, (*path, str(key)))

  visit(intermediates, ())
  return out


def _natural_key(path: str):
  # "block_2" before "block_10", "blocks[2]" before "blocks[10]".
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def gate_stats_from_arrays(
    arrays: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, np.ndarray | float]]:
  """Host-side view of `gate_arrays`: one entry per gated layer, scan stacks expanded.

  Args:
    arrays: the output of `gate_arrays` (device or host arrays; an average of several
      batches' outputs is fine).

  Returns:
    ``{layer path: {"entropy": float, "load": np.ndarray (H,), "max_entropy": log(H)}}``,
    sorted by path (numbers in natural order). Entropies are in nats, the mean over the
    batch's samples (convs: one gate per sample) or input rows (dense layers: one gate
    per token, padding included). Layer ``i`` of an `nn.scan` stack is named with an index on
    the path's first component, the module that `nn.scan` wraps in this package's models:
    ``"blocks[3]/mlp/fc1"``.
  """
  out = {}
  for path, stats in arrays.items():
    entropy = np.asarray(stats["entropy"], np.float64)
    load = np.asarray(stats["load"], np.float64)
    max_entropy = math.log(load.shape[-1])
    head, _, rest = path.partition("/")
    for index in np.ndindex(entropy.shape):
      name = head + "".join(f"[{i}]" for i in index) + ("/" + rest if rest else "")
      out[name] = {
          "entropy": float(entropy[index]), "load": load[index], "max_entropy": max_entropy
      }
  return {k: out[k] for k in sorted(out, key=_natural_key)}


def gate_stats(intermediates: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray | float]]:
  """Gate entropy and head load per gated layer, from a model's sown intermediates.

  ``gate_stats_from_arrays(gate_arrays(intermediates))``; see those two (the first runs
  inside jit, the second on the host).

  Example:
    ```python
    _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
    for path, s in gate_stats(state["intermediates"]).items():
      print(path, s["entropy"] / s["max_entropy"], s["load"])
    ```

  Args:
    intermediates: the ``"intermediates"`` collection (or the mutated-state dict).

  Returns:
    ``{layer path: {"entropy": float, "load": np.ndarray (H,), "max_entropy": float}}``.
  """
  return gate_stats_from_arrays(jax.device_get(gate_arrays(intermediates)))
