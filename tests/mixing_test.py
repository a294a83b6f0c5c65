"""Tests for `inhernet_jax.layers.mixing`: weight- and output-space mixing of the heads.

Both strategies must compute the same function from the same parameters (those of
`inherit`), keep the gate weights summing to one, and stay in the compute dtype.
"""

import functools
import re

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inhernet_jax import InherConv, InherDense, InherSpec, models
from inhernet_jax import inherit
from inhernet_jax.layers import mixing
from benchmarks.common import build_model

KEY = jax.random.key(0)
STRATS = ("weights", "outputs")


def _x(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _random(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.5, s.dtype), tree)


# kind -> (layer constructor(mixing, heads), input shape)
def _spec(heads, rank=2):
  return InherSpec(rank=rank, heads=heads, skip_if_no_saving=False)


LAYERS = {
    "dense": (lambda m, h: InherDense(6, spec=_spec(h), mixing=m), (2, 5, 7)),
    "conv": (lambda m, h: InherConv(6, (3, 3), strides=2, spec=_spec(h), mixing=m), (2, 7, 6, 3)),
    "conv-unbatched": (lambda m, h: InherConv(6, (3, 3), spec=_spec(h), mixing=m), (5, 5, 3)),
    "grouped": (lambda m, h: InherConv(8, (3, 3), feature_group_count=2, spec=_spec(h), mixing=m),
                (2, 6, 6, 4)),
    "depthwise": (lambda m, h: InherConv(4, (3, 3), feature_group_count=4, use_bias=False,
                                         spec=_spec(h, rank=1), mixing=m), (2, 6, 6, 4)),
}


@pytest.mark.parametrize("heads", [1, 2, 3])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_strategies_share_params_and_outputs(kind, heads):
  make, shape = LAYERS[kind]
  x = _x(*shape)
  trees = {m: jax.eval_shape(make(m, heads).init, KEY, x) for m in ("auto", *STRATS)}
  assert trees["weights"] == trees["outputs"] == trees["auto"]
  params = _random(trees["weights"], seed=heads)  # Heads differ, gate far from uniform.
  out = {m: jax.jit(make(m, heads).apply)(params, x) for m in ("auto", *STRATS)}
  chex.assert_trees_all_close(out["outputs"], out["weights"], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(out["auto"], out["weights"], rtol=1e-5, atol=1e-5)
  if heads > 1:  # Not vacuous: the gate matters.
    flat = {**params, "params": {**params["params"], "gate": jax.tree.map(
        jnp.zeros_like, params["params"]["gate"])}}
    assert float(jnp.max(jnp.abs(make("outputs", heads).apply(flat, x) - out["outputs"]))) > 1e-3


@hypothesis.settings(max_examples=8)
@hypothesis.given(
    heads=st.integers(1, 3), per_sample=st.booleans(), batch=st.integers(1, 3),
    positions=st.integers(1, 5), rank=st.integers(1, 4), features=st.integers(1, 5),
    bias=st.booleans(), seed=st.integers(0, 2**16))
def test_mix_equals_naive_sum(heads, per_sample, batch, positions, rank, features, bias, seed):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((batch, positions, rank))
  kernel = rng.standard_normal((heads, rank, features))
  b = rng.standard_normal((heads, features)) if bias else None
  g = rng.dirichlet(np.ones(heads), (batch,) if per_sample else (batch, positions))
  gp = g[:, None, :] if per_sample else g
  naive = sum(gp[..., h, None] * (z @ kernel[h] + (b[h] if bias else 0)) for h in range(heads))
  for strategy in STRATS:
    got = mixing.mix(*(jnp.asarray(a, jnp.float32) if a is not None else None
                       for a in (z, kernel, b, g if heads > 1 else None)),
                     per_sample=per_sample, strategy=strategy)
    np.testing.assert_allclose(got, naive, rtol=1e-4, atol=1e-4, err_msg=strategy)


def test_choose_follows_the_cost_model():
  # ResNet-18 CIFAR at rank 1/4, batch 256, bf16: early stage (32x32, r=16, out=64) and
  # last stage (4x4, r=128, out=512).
  early = dict(batch=256, positions=1024, rank=16, features=64, heads=2, itemsize=2, per_sample=True)
  late = dict(early, positions=16, rank=128, features=512)
  assert mixing.choose(**early, backend="gpu") == "weights"
  assert mixing.choose(**late, backend="gpu") == "outputs"  # Per-sample kernels > activations.
  assert mixing.choose(**late, backend="cpu") == "weights"  # FLOP-bound: P + H - 1 < P H.
  assert mixing.choose(**dict(late, heads=1), backend="gpu") == "weights"
  # Per token: the same GEMM FLOPs; bytes H r against H n.
  token = dict(batch=128 * 196, positions=1, rank=96, features=384, heads=2, itemsize=2,
               per_sample=False)
  assert mixing.choose(**token, backend="gpu") == "weights"
  assert mixing.choose(**dict(token, rank=384, features=96), backend="gpu") == "outputs"
  c = mixing.costs(**late)
  assert c["outputs"][0] > c["weights"][0] and c["outputs"][1] < c["weights"][1]


def test_bad_strategy_names_the_layer():
  layer = InherConv(6, (3, 3), spec=_spec(2), mixing="fast")
  with pytest.raises(ValueError, match=r"mixing must be one of .*'fast'"):
    jax.eval_shape(layer.init, KEY, _x(2, 5, 5, 3))
  with pytest.raises(ValueError, match="mixing must be one of"):  # Teachers check it too.
    jax.eval_shape(InherDense(3, mixing="x").init, KEY, _x(2, 3))


# -------------------------------------------------------------- exactness at init
def _model(name, strategy):
  model, shape, _, preset = build_model(name, tiny=True)
  return model.clone(conv=functools.partial(InherConv, mixing=strategy),
                     dense=functools.partial(InherDense, mixing=strategy)) if name == "vit_tiny" else \
      model.clone(conv=functools.partial(InherConv, mixing=strategy)), shape


@pytest.mark.parametrize("name, heads", [("resnet8", 1), ("resnet8", 2), ("resnet8", 3), ("vit_tiny", 2)])
def test_full_rank_inheritance_is_the_teacher_for_both_strategies(name, heads):
  teacher, shape = _model(name, "weights")
  x = _x(2, *((8, 8, 3) if name == "resnet8" else shape))
  variables = jax.jit(functools.partial(teacher.init, train=False))(KEY, x)
  want = jax.jit(functools.partial(teacher.apply, train=False))(variables, x)
  spec = InherSpec(rank=1.0, heads=heads, skip_if_no_saving=False)
  params = inherit(variables["params"], spec)
  for strategy in STRATS:
    student = _model(name, strategy)[0].clone(spec=spec)
    tree = jax.eval_shape(functools.partial(student.init, train=False), KEY, x)["params"]
    assert jax.tree.map(lambda a: (a.shape, a.dtype), tree) == jax.tree.map(
        lambda a: (a.shape, a.dtype), params), strategy
    got = jax.jit(functools.partial(student.apply, train=False))({**variables, "params": params}, x)
    scale = float(jnp.max(jnp.abs(want)))
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5 * scale)


# ---------------------------------------------------------------- compute dtype
def _train_step_hlo(layer, x, params):
  def loss(p):
    return jnp.sum(jnp.square(layer.apply(p, x).astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss)).lower(params).as_text()


def _ops(hlo, op):
  """Result element types of every ``stablehlo.<op>`` in the text."""
  return [re.findall(r"x?([a-z]+[0-9]+)>", line.rsplit("->", 1)[-1])[-1]
          for line in hlo.splitlines() if f"stablehlo.{op}" in line]


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_bfloat16_train_step_has_no_float32_islands(kind, strategy):
  """float32 params, bf16 compute: every contraction and the gate's softmax run in bf16."""
  heads, features = 2, 6
  if kind == "conv":
    layer = InherConv(features, (3, 3), spec=_spec(heads), mixing=strategy, dtype=jnp.bfloat16)
    x = _x(4, 6, 6, 3).astype(jnp.bfloat16)
  else:
    layer = InherDense(features, spec=_spec(heads), mixing=strategy, dtype=jnp.bfloat16)
    x = _x(4, 5, 7).astype(jnp.bfloat16)
  params = jax.eval_shape(layer.init, KEY, x)
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  hlo = _train_step_hlo(layer, x, params)
  contractions = _ops(hlo, "dot_general") + _ops(hlo, "convolution")
  assert contractions and set(contractions) == {"bf16"}, contractions
  exps = _ops(hlo, "exponential")
  assert exps and set(exps) == {"bf16"}, exps  # The gate softmax, forward and backward.
  # The expected contraction: all heads side by side (r x H out) for "outputs"; per
  # sample (r x out) kernels for conv "weights"; (H r) x out for dense "weights".
  dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
  signature = {
      ("conv", "outputs"): f"x{heads * features}xbf16>",
      ("dense", "outputs"): f"x{heads * features}xbf16>",
      ("conv", "weights"): f"tensor<4x2x{features}xbf16>",
      ("dense", "weights"): f"tensor<{heads * 2}x{features}xbf16>",
  }[kind, strategy]
  assert any(signature in line for line in dots), (signature, dots)
