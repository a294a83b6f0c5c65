"""Parameter counts, FLOPs and the rank that meets a parameter budget."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import inhernet_jax as ij
from inhernet_jax.decomposition import accounting
from inhernet_jax.models.small import CNN as DigitsCNN

WIDTHS = (8, 16, 32)
X = jnp.zeros((2, 8, 8, 1), jnp.float32)


@pytest.fixture(scope="module")
def teacher_params():
  shapes = jax.eval_shape(DigitsCNN(widths=WIDTHS).init, jax.random.key(0), X)["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


@pytest.mark.parametrize(
    "spec",
    [
        ij.InherSpec(rank=2),
        ij.InherSpec(rank=3, heads=3),
        ij.InherSpec(rank=0.5, heads=2, rules=(("head/kernel", "skip"),)),
        ij.InherSpec(param_ratio=0.3, heads=2),
        ij.InherSpec(energy=0.6, heads=2),
    ],
    ids=["rank", "heads", "fraction-rule", "param_ratio", "energy"],
)
def test_planned_count_equals_inherited_tree(teacher_params, spec):
  from inhernet_jax.decomposition.transform import planned_param_count

  planned = planned_param_count(teacher_params, spec)
  assert planned == accounting.param_count(ij.inherit(teacher_params, spec))


def test_param_count_of_shapes_and_arrays_agree(teacher_params):
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), teacher_params)
  expected = sum(a.size for a in jax.tree.leaves(teacher_params))
  assert accounting.param_count(shapes) == accounting.param_count(teacher_params) == expected


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.6])
def test_rank_for_params_is_largest_rank_within_budget(teacher_params, heads, fraction):
  from inhernet_jax.decomposition.transform import planned_param_count

  target = int(fraction * accounting.param_count(teacher_params))
  rank = accounting.rank_for_params(teacher_params, target, heads=heads)
  count = lambda r: planned_param_count(teacher_params, ij.InherSpec(rank=r, heads=heads))
  assert count(rank) <= target
  assert count(rank + 1) > target
  spec = accounting.spec_for_params(teacher_params, target, heads=heads)
  assert accounting.param_count(ij.inherit(teacher_params, spec)) <= target


def test_rank_for_params_rejects_unreachable_budget(teacher_params):
  with pytest.raises(ValueError, match="rank 1"):
    accounting.rank_for_params(teacher_params, 10, heads=2)


def test_forward_flops_of_a_dense_layer_and_of_an_inherited_net(teacher_params):
  dense = nn.Dense(24)
  x = jax.ShapeDtypeStruct((4, 16), jnp.float32)
  variables = jax.eval_shape(dense.init, jax.random.key(0), x)
  flops = accounting.forward_flops(dense.apply, variables, x)
  # XLA counts a multiply-add as 2 FLOPs; the bias adds batch*out more.
  assert 2 * 4 * 16 * 24 <= flops <= 2 * 4 * 16 * 24 + 4 * 24 * 2
  teacher = DigitsCNN(widths=WIDTHS)
  spec = ij.InherSpec(rank=2, heads=1)
  t_flops = accounting.forward_flops(teacher.apply, {"params": teacher_params}, X)
  s_flops = accounting.forward_flops(
      teacher.clone(spec=spec).apply, {"params": ij.inherit(teacher_params, spec)}, X
  )
  assert 0 < s_flops < t_flops


def test_rank_for_params_with_rank_multiple(teacher_params):
  """Uniform ranks in multiples of ``rank_multiple``: the largest multiple within budget."""
  from inhernet_jax.decomposition.transform import planned_param_count

  target = int(0.4 * accounting.param_count(teacher_params))
  rank = accounting.rank_for_params(teacher_params, target, heads=2, rank_multiple=4)
  assert rank % 4 == 0 and rank >= 4
  spec = lambda r: ij.InherSpec(rank=r, heads=2, rank_multiple=4)  # noqa: E731
  assert planned_param_count(teacher_params, spec(rank)) <= target
  assert planned_param_count(teacher_params, spec(rank + 1)) > target  # Rounds up to rank + 4.
  assert rank >= accounting.rank_for_params(teacher_params, target, heads=2) - 3
