"""The paper's ablations as layer variants (`InherSpec.variant`), linen and NNX.

Each variant at H = 3: right after `inherit` the network computes the rank-r
truncation (the H = 1 network's output), the layers' own init has the shapes `inherit`
makes, and the parameter count is the formula's (no gate for ``no_gate``; H
down-projections for ``symmetric``). One tiny CNN shared by every test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import inhernet_jax as ij
from inhernet_jax.decomposition import accounting, policy
from inhernet_jax.decomposition.transform import planned_param_count
from inhernet_jax.experiment import validate
from inhernet_jax.models import cifar

VARIANTS = ("gated", "no_gate", "symmetric")
RULES = ((r"stem/.*", "skip"), (r"head/.*", "skip"))
X = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))


@pytest.fixture(scope="module")
def teacher():
  model = cifar._resnet(8, (4, 4, 8, 8))(num_classes=5)
  return model, model.init(jax.random.key(1), X, train=False)


def _spec(variant, heads=3):
  return ij.InherSpec(rank=3, heads=heads, variant=variant, rules=RULES, skip_if_no_saving=False)


@pytest.fixture(scope="module")
def truncation(teacher):
  model, v = teacher
  spec = _spec("gated", heads=1)
  return model.clone(spec=spec).apply(dict(v, params=ij.inherit(v["params"], spec)), X,
                                      train=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_is_the_truncation_at_init_and_its_shapes_are_the_layers(teacher, truncation,
                                                                         variant):
  model, v = teacher
  spec = _spec(variant)
  params = ij.inherit(v["params"], spec)
  student = model.clone(spec=spec)
  y = student.apply(dict(v, params=params), X, train=False)
  np.testing.assert_allclose(np.asarray(y), np.asarray(truncation), atol=1e-5, rtol=1e-5)
  shapes = jax.eval_shape(lambda: student.init(jax.random.key(0), X, train=False))["params"]
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params)
  # The network is not the H = 1 one: heads (and gates) are there to be trained apart.
  conv = params["layer3_0"]["conv2"]
  assert conv["up"]["kernel"].shape[0] == 3
  assert ("gate" in conv) == (variant != "no_gate")
  assert conv["down"]["kernel"].shape[-1] == (9 if variant == "symmetric" else 3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_counts_agree_with_the_formula(teacher, variant):
  model, v = teacher
  spec = _spec(variant)
  params = ij.inherit(v["params"], spec)
  count = accounting.param_count(params)
  assert planned_param_count(v["params"], spec) == count
  # layer3_0/conv2: a 3x3 conv 8 -> 8 without bias: m = 72, n = 8.
  layer = accounting.param_count(params["layer3_0"]["conv2"])
  assert layer == policy.inherited_params(72, 8, 3, 3, False, variant)
  by_hand = {"gated": 72 * 3 + 3 * 3 * 8 + 3 * 3 + 3, "no_gate": 72 * 3 + 3 * 3 * 8,
             "symmetric": 3 * 72 * 3 + 3 * 3 * 8 + 3 * 3 + 3}
  assert layer == by_hand[variant]


def test_counts_order_and_budget_respects_the_variant(teacher):
  _, v = teacher
  counts = {var: planned_param_count(v["params"], _spec(var)) for var in VARIANTS}
  assert counts["no_gate"] < counts["gated"] < counts["symmetric"]
  target = counts["gated"]
  rank = accounting.rank_for_params(v["params"], target, heads=3, rules=RULES,
                                    variant="symmetric")
  assert planned_param_count(v["params"], ij.InherSpec(
      rank=rank, heads=3, rules=RULES, variant="symmetric")) <= target
  assert rank < 3


def test_no_gate_mixes_with_equal_weights_after_training_moves_the_heads(teacher):
  model, v = teacher
  spec = _spec("no_gate")
  params = ij.inherit(v["params"], spec)
  up = params["layer3_0"]["conv2"]["up"]
  moved = dict(up, kernel=up["kernel"].at[1].multiply(3.0))
  params = jax.tree.map(lambda x: x, params)
  params["layer3_0"]["conv2"]["up"] = moved
  y = model.clone(spec=spec).apply(dict(v, params=params), X, train=False)
  # Equal weights: heads 0, 1, 2 as (1 + 3 + 1) / 3 of head 0 on that layer; different.
  y0 = model.clone(spec=spec).apply(dict(v, params=ij.inherit(v["params"], spec)), X,
                                    train=False)
  assert not np.allclose(np.asarray(y), np.asarray(y0))


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="variant"):
    ij.InherSpec(rank=2, variant="sym")


def test_method_variant_is_validated():
  p = validate._Problems()  # pylint: disable=protected-access
  validate._check_method(p, {}, "m", {"kind": "inhernet", "rank": 2, "variant": "x"}, [])
  assert any("variant" in e for e in p)


class _NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 8, (3, 3), use_bias=True, rngs=rngs)
    self.fc = nnx.Linear(8, 6, rngs=rngs)

  def __call__(self, x):
    return self.fc(nnx.relu(self.conv(x)).mean((1, 2)))


@pytest.mark.parametrize("variant", ("no_gate", "symmetric"))
def test_nnx_variants_are_the_truncation(variant):
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 2))
  reference = _NNXNet(nnx.Rngs(0))
  ij.nnx.inherit(reference, ij.InherSpec(rank=2, heads=1, skip_if_no_saving=False))
  net = _NNXNet(nnx.Rngs(0))
  ij.nnx.inherit(net, ij.InherSpec(rank=2, heads=3, variant=variant, skip_if_no_saving=False))
  np.testing.assert_allclose(np.asarray(net(x)), np.asarray(reference(x)), atol=1e-5)
  assert net.conv.variant == variant
  assert (net.conv.gate is None) == (variant == "no_gate")
  assert net.conv.down.kernel.shape[-1] == (6 if variant == "symmetric" else 2)
