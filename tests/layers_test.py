"""Tests for `inhernet_jax.layers.linen`: `InherDense` / `InherConv`.

Without a spec the layers must be `nn.Dense` / `nn.Conv`; with one, a shared
down-projection (with the teacher's conv geometry), H gated expert up-projections and a
softmax gate. Naive references are written out here from the parameters.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inhernet_jax import InherConv, InherDense, InherSpec

FEATURES = 6
RANK = 2
KEY = jax.random.key(0)


def forced(heads, rank=RANK):
  """A spec that factorises every layer (these layers are too small to save much)."""
  return InherSpec(rank=rank, heads=heads, skip_if_no_saving=False)


def _x(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# name -> (nn.Conv kwargs, input shape); 3 input channels everywhere.
CONVS = {
    "1d-same": (dict(kernel_size=(3,), padding="SAME"), (2, 10, 3)),
    "1d-stride-valid-dilated": (dict(kernel_size=(3,), strides=2, padding="VALID", kernel_dilation=2), (2, 11, 3)),
    "2d-stride-same": (dict(kernel_size=(3, 3), strides=(2, 1), padding="SAME"), (2, 8, 7, 3)),
    "2d-explicit-dilated": (dict(kernel_size=(3, 2), padding=((1, 0), (2, 1)), kernel_dilation=(2, 1)), (2, 8, 7, 3)),
    "2d-input-dilation": (dict(kernel_size=(2, 2), padding=((0, 1), (1, 0)), input_dilation=2), (2, 5, 5, 3)),
    "2d-circular": (dict(kernel_size=(3, 3), padding="CIRCULAR"), (2, 6, 6, 3)),
    "3d-valid": (dict(kernel_size=(2, 2, 2), padding="VALID"), (2, 4, 5, 4, 3)),
}


def random_params(layer, x, seed=0, dtype=None):
  """Random values in the layout of ``layer.init(KEY, x)["params"]``, built in numpy.

  Shapes come from `jax.eval_shape`, so no initializer is compiled (on CPU, compiling
  the PRNG programs of eager inits costs more than the tests themselves).
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(layer.init, KEY, x)["params"]
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(max(s.shape[-2:-1] or (1,))), dtype or s.dtype), shapes)


def merged_conv_params(params):
  """Teacher-layout params of a factorised layer whose heads are all identical."""
  down = params["down"]["kernel"]
  up = params["up"]["kernel"][0]
  out = {"kernel": jnp.einsum("...cr,rn->...cn", down, up, precision="highest")}
  if "bias" in params["up"]:
    out["bias"] = params["up"]["bias"][0]
  return out


def with_identical_heads(params):
  """Copies head 0 into every head."""
  params = jax.tree.map(lambda a: a, params)  # Fresh containers.
  up = dict(params["up"])
  up["kernel"] = jnp.broadcast_to(up["kernel"][:1], up["kernel"].shape)
  if "bias" in up:
    up["bias"] = jnp.broadcast_to(up["bias"][:1], up["bias"].shape)
  return {**params, "up": up}


def perturbed(params, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: a + scale * jnp.asarray(rng.standard_normal(a.shape), a.dtype), params)


def softmax(logits):
  logits = np.asarray(logits, np.float64)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------- no spec: nn.*
@pytest.mark.parametrize("spec", [None, InherSpec(rank=FEATURES)], ids=["no-spec", "kept-by-spec"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_without_factorisation_is_nn_conv(name, spec):
  kwargs, shape = CONVS[name]
  x = _x(*shape)
  teacher = nn.Conv(FEATURES, **kwargs)
  layer = InherConv(FEATURES, spec=spec, **kwargs)
  assert jax.eval_shape(layer.init, KEY, x) == jax.eval_shape(teacher.init, KEY, x)
  params = {"params": random_params(teacher, x, seed=1)}  # Non-zero bias.
  chex.assert_trees_all_equal(layer.apply(params, x), teacher.apply(params, x))


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("spec", [None, InherSpec(rank=FEATURES)], ids=["no-spec", "kept-by-spec"])
def test_dense_without_factorisation_is_nn_dense(spec, use_bias):
  x = _x(2, 5, 7)
  teacher = nn.Dense(FEATURES, use_bias=use_bias)
  layer = InherDense(FEATURES, use_bias=use_bias, spec=spec)
  assert jax.eval_shape(layer.init, KEY, x) == jax.eval_shape(teacher.init, KEY, x)
  params = {"params": random_params(teacher, x, seed=1)}
  chex.assert_trees_all_equal(layer.apply(params, x), teacher.apply(params, x))


def test_same_initial_values_as_nn_layers():
  """Teacher checkpoints are interchangeable: same names, same initializers, same RNG."""
  x = _x(1, 4, 4, 2)
  for teacher, layer in [(nn.Dense(3), InherDense(3)), (nn.Conv(3, (2, 2)), InherConv(3, (2, 2)))]:
    key = jax.random.key(0, impl="rbg")  # Cheaper to compile than threefry.
    chex.assert_trees_all_equal(jax.jit(layer.init)(key, x), jax.jit(teacher.init)(key, x))


# ------------------------------------------------------------------ factorised conv
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("name", list(CONVS))
def test_factorised_conv_structure_and_geometry(name, heads):
  kwargs, shape = CONVS[name]
  x = _x(*shape)
  layer = InherConv(FEATURES, spec=forced(heads), **kwargs)
  params = random_params(layer, x, seed=2)
  ks = kwargs["kernel_size"]
  expected = {
      "down": {"kernel": (*ks, 3, RANK)},
      "up": {"kernel": (heads, RANK, FEATURES), "bias": (heads, FEATURES)},
  }
  if heads > 1:
    expected["gate"] = {"kernel": (RANK, heads), "bias": (heads,)}
  assert jax.tree.map(lambda a: a.shape, params) == expected
  # With identical heads (any gate) the layer is the teacher conv with the merged kernel
  # down @ up: same strides, padding and dilations, hence same output.
  params = with_identical_heads(params)  # Random bias and gate too.
  teacher = nn.Conv(FEATURES, **kwargs)
  want = teacher.apply({"params": merged_conv_params(params)}, x)
  got = layer.apply({"params": params}, x)
  assert got.shape == want.shape == jax.eval_shape(teacher.init_with_output, KEY, x)[0].shape
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups, heads", [(2, 1), (4, 3)])
def test_grouped_conv_factorises_its_kernel_matrix(groups, heads):
  # The (3, 3, 4 / G, 8) kernel is one (9 * 4 / G) x 8 matrix (as `inherit` sees it):
  # with identical heads the layer is the grouped teacher conv with kernel down @ up.
  x = _x(2, 6, 6, 4)
  kwargs = dict(kernel_size=(3, 3), feature_group_count=groups, strides=2, padding="SAME")
  layer = InherConv(8, spec=InherSpec(rank=2, heads=heads, skip_if_no_saving=False), **kwargs)
  params = random_params(layer, x)
  assert params["down"]["kernel"].shape == (3, 3, 4 // groups, 2)
  assert params["up"]["kernel"].shape == (heads, 2, 8)
  params = with_identical_heads(params)
  teacher = nn.Conv(8, **kwargs)
  want = teacher.apply({"params": merged_conv_params(params)}, x)
  chex.assert_trees_all_close(layer.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)
  if heads > 1:  # Different heads, a constant gate g: the merged kernel is down @ sum g_h up_h.
    params = random_params(layer, x, seed=1)
    params["gate"] = {"kernel": jnp.zeros_like(params["gate"]["kernel"]), "bias": params["gate"]["bias"]}
    g = jax.nn.softmax(params["gate"]["bias"])
    merged = {"down": params["down"], "up": {k: jnp.einsum("h,h...->...", g, v)[None]
                                              for k, v in params["up"].items()}}
    want = teacher.apply({"params": merged_conv_params(merged)}, x)
    chex.assert_trees_all_close(layer.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)
  # Without a spec it is nn.Conv, grouped or not.
  plain = {"params": random_params(teacher, x)}
  chex.assert_trees_all_equal(InherConv(8, **kwargs).apply(plain, x), teacher.apply(plain, x))


def test_grouped_conv_with_indivisible_channels_is_refused():
  x = _x(2, 6, 6, 4)
  with pytest.raises(ValueError, match="feature_group_count=2"):
    jax.eval_shape(InherConv(7, (3, 3), feature_group_count=2, spec=InherSpec(rank=2)).init, KEY, x)


def test_spec_must_be_an_inherspec():
  with pytest.raises(TypeError, match="spec"):
    jax.eval_shape(InherDense(4, spec={"rank": 2}).init, KEY, _x(1, 8))


# -------------------------------------------------------------------- gate behaviour
def _dense_case(heads, x=None):
  layer = InherDense(FEATURES, spec=forced(heads))
  x = _x(2, 5, 7) if x is None else x
  return layer, random_params(layer, x, seed=heads), x


def _conv_case(heads):
  kwargs, shape = CONVS["2d-stride-same"]
  layer = InherConv(FEATURES, spec=forced(heads), **kwargs)
  x = _x(*shape)
  return layer, random_params(layer, x, seed=heads), x


CASES = {"dense": _dense_case, "conv": _conv_case}


@pytest.mark.parametrize("kind", list(CASES))
def test_identical_heads_make_output_independent_of_gate(kind):
  """The gate weights sum to one: with identical heads the gate cannot matter."""
  layer, params, x = CASES[kind](3)
  apply = jax.jit(layer.apply)
  params = with_identical_heads(params)
  base = apply({"params": params}, x)
  scale = float(jnp.max(jnp.abs(base)))
  for seed in (5, 6):
    gate = perturbed(params["gate"], seed=seed, scale=5.0)
    out = apply({"params": {**params, "gate": gate}}, x)
    chex.assert_trees_all_close(out, base, rtol=1e-6, atol=1e-6 * scale)
  # Control: with distinct heads the gate does matter.
  distinct = perturbed(params, seed=7)
  moved = apply({"params": {**distinct, "gate": perturbed(distinct["gate"], seed=8, scale=5.0)}}, x)
  assert not np.allclose(moved, apply({"params": distinct}, x), atol=1e-3 * scale)


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("kind", list(CASES))
def test_gradients_are_finite(kind, heads):
  layer, params, x = CASES[kind](heads)

  def loss(p):
    return jnp.mean(jnp.square(layer.apply({"params": p}, x) - 1.0))

  grads = jax.jit(jax.grad(loss))(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), path  # Every parameter takes part in the output.


@pytest.mark.parametrize("kind", list(CASES))
def test_random_gate_breaks_head_symmetry(kind):
  """Identical heads (as right after inheritance) diverge under SGD only if the gate is
  not uniform: with a uniform gate every head gets the same gradient forever."""
  layer, params, x = CASES[kind](3)
  params = with_identical_heads(params)
  target = _x(*layer.apply({"params": params}, x).shape, seed=11)

  @jax.jit
  def step(p):
    def loss(p):
      return jnp.mean(jnp.square(layer.apply({"params": p}, x) - target))

    return jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(loss)(p))

  def head_spread(p):
    for _ in range(3):
      p = step(p)
    up = np.asarray(p["up"]["kernel"])
    return np.max(np.abs(up - up[:1])) / np.max(np.abs(up))

  assert head_spread(params) > 1e-4
  uniform = {**params, "gate": jax.tree.map(jnp.zeros_like, params["gate"])}
  assert head_spread(uniform) < 1e-6


# -------------------------------------------------------------- naive mixing formulas
def test_per_sample_conv_mixing_equals_naive_sum():
  kwargs, shape = CONVS["2d-stride-same"]
  layer, params, x = _conv_case(3)
  params = perturbed(params, seed=12)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  z = nn.Conv(RANK, use_bias=False, **kwargs).apply({"params": {"kernel": params["down"]["kernel"]}}, x)
  z = np.asarray(z, np.float64)  # (B, H, W, r)
  g = softmax(z.mean((1, 2)) @ p["gate"]["kernel"] + p["gate"]["bias"])  # (B, heads): per sample
  heads = [z @ p["up"]["kernel"][h] + p["up"]["bias"][h] for h in range(3)]
  naive = sum(g[:, h, None, None, None] * heads[h] for h in range(3))
  np.testing.assert_allclose(layer.apply({"params": params}, x), naive, rtol=1e-4, atol=1e-5)


def test_per_token_dense_gating_equals_naive_sum():
  layer, params, x = _dense_case(3)
  params = perturbed(params, seed=13)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  z = np.asarray(x, np.float64) @ p["down"]["kernel"]  # (B, T, r)
  g = softmax(z @ p["gate"]["kernel"] + p["gate"]["bias"])  # (B, T, heads): per token
  naive = sum(g[..., h, None] * (z @ p["up"]["kernel"][h] + p["up"]["bias"][h]) for h in range(3))
  np.testing.assert_allclose(layer.apply({"params": params}, x), naive, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize(
    "dtype, param_dtype", [(jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32), (None, jnp.bfloat16)]
)
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_dtype_and_param_dtype(kind, dtype, param_dtype):
  kwargs = dict(dtype=dtype, param_dtype=param_dtype, spec=forced(3))
  if kind == "dense":
    layer, x = InherDense(FEATURES, **kwargs), _x(2, 5, 7).astype(jnp.bfloat16)
  else:
    conv_kwargs, shape = CONVS["2d-stride-same"]
    layer, x = InherConv(FEATURES, **conv_kwargs, **kwargs), _x(*shape).astype(jnp.bfloat16)
  assert {a.dtype for a in jax.tree.leaves(jax.eval_shape(layer.init, KEY, x))} == {jnp.dtype(param_dtype)}
  params = random_params(layer, x, seed=3, dtype=param_dtype)
  apply = jax.jit(layer.apply)
  out = apply({"params": params}, x)
  # dtype=None: computation dtype is inferred from the (all bf16) inputs and params.
  assert out.dtype == jnp.dtype(dtype or jnp.bfloat16)
  # The gate weights sum to exactly one in bf16 too: identical heads give the same
  # output, bit for bit, whatever the gate (a bf16 softmax alone is off by up to 3e-3).
  same = with_identical_heads(params)
  one = {**same, "gate": jax.tree.map(jnp.zeros_like, same["gate"])}
  gated = {**same, "gate": perturbed(same["gate"], seed=14, scale=3.0)}
  np.testing.assert_array_equal(
      np.asarray(apply({"params": gated}, x), np.float32),
      np.asarray(apply({"params": one}, x), np.float32))


# ------------------------------------------------------------------ unbatched input
@pytest.mark.parametrize("heads", [1, 2])
def test_unbatched_conv_input(heads):
  kwargs, shape = CONVS["2d-stride-same"]
  layer = InherConv(FEATURES, spec=forced(heads), **kwargs)
  x = _x(*shape)
  params = random_params(layer, x, seed=15)
  batched = layer.apply({"params": params}, x)
  for i in range(shape[0]):
    single = layer.apply({"params": params}, x[i])
    assert single.shape == batched.shape[1:]
    chex.assert_trees_all_close(single, batched[i], rtol=1e-5, atol=1e-6)
