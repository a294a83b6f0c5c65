"""Tests for the gate statistics of `inhernet_jax.layers.linen`: sown load and entropy per layer.

References recompute ``g = softmax(gate(z))`` in NumPy from each layer's parameters.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from inhernet_jax import InherConv, InherDense, InherSpec, models
from inhernet_jax.layers import linen as layers

KEY = jax.random.key(0)


def forced(heads, rank=2):
  return InherSpec(rank=rank, heads=heads, skip_if_no_saving=False)


def _x(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def random_params(module, *args, seed=0, **kwargs):
  """Random params in ``module``'s layout, built in numpy (no initializer compiles)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda *a: module.init(KEY, *a, **kwargs), *args)
  assert set(shapes) == {"params"}  # init never keeps the sown statistics.
  return jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes["params"]
  )


def reference(z_summary, gate):
  """(entropy, load) of ``softmax(z @ W + b)`` over all leading positions, float64."""
  logits = np.asarray(z_summary, np.float64) @ np.asarray(gate["kernel"], np.float64)
  logits += np.asarray(gate["bias"], np.float64)
  g = np.exp(logits - logits.max(-1, keepdims=True))
  g /= g.sum(-1, keepdims=True)
  g = g.reshape(-1, g.shape[-1])
  return float(np.mean(-np.sum(g * np.log(g), axis=-1))), g.mean(0)


def check_ranges(stats):
  for path, s in stats.items():
    heads = s["load"].shape
    assert s["max_entropy"] == math.log(heads[0]), path
    np.testing.assert_allclose(s["load"].sum(), 1.0, rtol=1e-5, err_msg=path)
    assert np.all(s["load"] >= 0), path
    # float32 entropy of a near-uniform gate may exceed log(H) by an ulp.
    assert -1e-6 <= s["entropy"] <= s["max_entropy"] + 1e-6, path


class Net(nn.Module):
  """A factorised conv (H=2, per-sample gate), a dense (H=3, per-token gate) and an
  ungated dense (H=1)."""

  @nn.compact
  def __call__(self, x):
    x = InherConv(4, (3, 3), strides=2, spec=forced(2), name="conv")(x)
    x = InherDense(5, spec=forced(3), name="fc")(nn.relu(x))
    return InherDense(2, spec=forced(1), name="plain")(x)


def test_dense_and_conv_stats_equal_direct_recomputation():
  net, x = Net(), _x(2, 6, 6, 3)
  params = random_params(net, x, seed=1)
  _, state = net.apply({"params": params}, x, mutable=["intermediates"])
  stats = layers.gate_stats(state["intermediates"])
  assert list(stats) == ["conv", "fc"]  # one per gated layer; "plain" has no gate
  check_ranges(stats)
  assert stats["conv"]["load"].shape == (2,) and stats["fc"]["load"].shape == (3,)

  # conv: one gate per sample, from the global-average-pooled bottleneck.
  p = params["conv"]
  z = nn.Conv(2, (3, 3), strides=2, use_bias=False).apply({"params": p["down"]}, x)
  entropy, load = reference(np.asarray(z).mean(axis=(1, 2)), p["gate"])
  np.testing.assert_allclose(stats["conv"]["entropy"], entropy, rtol=1e-5)
  np.testing.assert_allclose(stats["conv"]["load"], load, rtol=1e-5)

  # dense: one gate per token (here per pixel of the conv output).
  conv = InherConv(4, (3, 3), strides=2, spec=forced(2))
  h = nn.relu(conv.apply({"params": params["conv"]}, x))
  z = np.asarray(h, np.float64) @ np.asarray(params["fc"]["down"]["kernel"], np.float64)
  entropy, load = reference(z, params["fc"]["gate"])
  np.testing.assert_allclose(stats["fc"]["entropy"], entropy, rtol=1e-5)
  np.testing.assert_allclose(stats["fc"]["load"], load, rtol=1e-5)


def test_sowing_costs_nothing_unless_intermediates_are_mutable():
  layer, x = InherDense(6, spec=forced(3)), _x(2, 5, 7)
  variables = {"params": random_params(layer, x)}
  plain = str(jax.make_jaxpr(lambda v: layer.apply(v, x))(variables))
  sown = str(jax.make_jaxpr(lambda v: layer.apply(v, x, mutable=["intermediates"]))(variables))
  # The entropy's log is the only log in the layer: absent unless asked for.
  assert " log " not in plain and " log " in sown
  out = layer.apply(variables, x)
  assert isinstance(out, jax.Array)
  _, state = layer.apply(variables, x, mutable=["intermediates"])
  assert set(state["intermediates"]) == {layers.GATE_STATS}
  assert isinstance(state["intermediates"][layers.GATE_STATS], tuple)  # flax's sow default


def test_scanned_transformer_has_one_entry_per_layer_and_matches_recomputation():
  depth = 2
  model = models.create(
      "gpt2_small", num_classes=32, width=32, depth=depth, num_heads=2, mlp_dim=64,
      max_len=16, scan=True, spec=forced(2, rank=4),
  )
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 32, (2, 8)), jnp.int32)
  params = random_params(model, tokens, train=False, seed=3)
  params = jax.tree.map(lambda a: 0.3 * a, params)  # Keep activations moderate.

  @jax.jit
  def run(params):
    _, state = model.apply(
        {"params": params}, tokens, train=False, mutable=["intermediates"],
        # Also capture fc1's bottleneck z (the output of its "down"), for the reference.
        capture_intermediates=lambda m, method: m.path[-2:] == ("fc1", "down"),
    )
    return layers.gate_arrays(state["intermediates"]), state["intermediates"]

  arrays, intermediates = run(params)
  assert arrays["blocks/mlp/fc1"]["entropy"].shape == (depth,)
  assert arrays["blocks/mlp/fc1"]["load"].shape == (depth, 2)
  stats = layers.gate_stats_from_arrays(jax.device_get(arrays))
  gated = [f"attn/{n}" for n in ("key", "out", "query", "value")] + ["mlp/fc1", "mlp/fc2"]
  want = [f"blocks[{i}]/{n}" for i in range(depth) for n in gated] + ["head"]
  assert list(stats) == want
  check_ranges(stats)
  # The same as the eager, un-jitted helper.
  eager = layers.gate_stats(intermediates)
  assert list(eager) == want
  for k in want:
    np.testing.assert_allclose(eager[k]["load"], stats[k]["load"], rtol=1e-6)

  z = intermediates["blocks"]["mlp"]["fc1"]["down"]["__call__"][0]  # (depth, B, T, r)
  for i in range(depth):
    gate = jax.tree.map(lambda a: a[i], params["blocks"]["mlp"]["fc1"]["gate"])
    entropy, load = reference(z[i], gate)
    got = stats[f"blocks[{i}]/mlp/fc1"]
    np.testing.assert_allclose(got["entropy"], entropy, rtol=1e-4)
    np.testing.assert_allclose(got["load"], load, rtol=1e-4)
  # The layers differ, so the index is not mixed up.
  assert not np.allclose(stats["blocks[0]/mlp/fc1"]["load"], stats["blocks[1]/mlp/fc1"]["load"])


def test_gate_arrays_averages_repeated_calls_and_ignores_other_values():
  one = {"entropy": jnp.float32(0.2), "load": jnp.array([0.25, 0.75])}
  two = {"entropy": jnp.float32(0.4), "load": jnp.array([0.75, 0.25])}
  tree = {
      "intermediates": {
          "enc": {"fc": {layers.GATE_STATS: (one, two), "__call__": (jnp.ones(3),)}},
          "other": {"features": (jnp.ones(2),)},
      }
  }
  arrays = layers.gate_arrays(tree)  # the whole mutated state is accepted too
  assert list(arrays) == ["enc/fc"]
  np.testing.assert_allclose(arrays["enc/fc"]["entropy"], 0.3, rtol=1e-6)
  np.testing.assert_allclose(arrays["enc/fc"]["load"], [0.5, 0.5], rtol=1e-6)
  assert layers.gate_stats({}) == {}


def test_scan_axis_naming_and_natural_order():
  depth, heads = 11, 3
  load = np.full((depth, heads), 1 / heads)
  arrays = {
      "blocks/mlp/fc1": {"entropy": np.arange(depth) / 10, "load": load},
      "head": {"entropy": np.float32(0.5), "load": load[0]},
  }
  stats = layers.gate_stats_from_arrays(arrays)
  assert list(stats)[:3] == ["blocks[0]/mlp/fc1", "blocks[1]/mlp/fc1", "blocks[2]/mlp/fc1"]
  assert list(stats)[-2:] == ["blocks[10]/mlp/fc1", "head"]
  assert stats["blocks[7]/mlp/fc1"]["entropy"] == 0.7
  assert stats["head"]["max_entropy"] == math.log(3)
