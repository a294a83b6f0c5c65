"""Tests for `inhernet_jax.layers.folding` (`layers.fold`): folded networks give the same logits."""

import copy
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.common import build_model
from inhernet_jax import InherDense, InherSpec
from inhernet_jax import inherit
from inhernet_jax.layers import linen as layers
from inhernet_jax.layers import folding as fold_lib
from inhernet_jax.layers.folding import saves_flops

KEY = jax.random.key(0)
X = {"resnet8": (2, 8, 8, 3), "vit_tiny": (2, 32, 32, 3)}


@functools.cache
def _teacher(name):
  model = build_model(name, tiny=True)[0]
  x = jnp.asarray(np.random.default_rng(0).standard_normal(X[name]), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(KEY, x)
  return model, variables, x


def _logits(model, variables, x):
  return jax.jit(functools.partial(model.apply, train=False))(variables, x)


def _shapes(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


@pytest.mark.parametrize("name", ["resnet8", "vit_tiny"])
def test_full_rank_one_head_folds_to_the_teacher_layout(name):
  teacher, variables, x = _teacher(name)
  spec = InherSpec(rank=1.0, heads=1, skip_if_no_saving=False)
  student = teacher.clone(spec=spec)
  inherited = {**variables, "params": inherit(variables["params"], spec)}
  before = copy.deepcopy(jax.tree.map(np.asarray, inherited))
  served_vars, served = fold_lib.fold(inherited, student)
  # At full rank one kernel is cheaper than two: every layer folds, the teacher's layout.
  assert _shapes(served_vars) == _shapes(variables)
  assert served.spec is not student.spec
  want = _logits(student, inherited, x)
  chex.assert_trees_all_close(_logits(served, served_vars, x), want, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, inherited), before)  # Not mutated.


@pytest.mark.parametrize("name", ["resnet8", "vit_tiny"])
def test_gated_layers_stay_and_one_head_layers_fold_by_flops(name):
  teacher, variables, x = _teacher(name)
  # Two heads by default; one head (near full rank: folds) and one head at a low rank
  # (factorised is cheaper: stays) by rule.
  first, second = (r"layer1_0/.*", r"layer2_0/conv1/.*") if name == "resnet8" else \
      (r"block_0/mlp/.*", r"block_0/attn/query/.*")
  spec = InherSpec(rank=0.9, heads=2, skip_if_no_saving=False,
                   rules=((first, {"heads": 1}), (second, {"heads": 1, "rank": 2})))
  student = teacher.clone(spec=spec)
  inherited = {**variables, "params": jax.tree.map(  # Perturbed: heads differ, gates matter.
      lambda a: a + 0.05 * jnp.asarray(np.random.default_rng(1).standard_normal(a.shape), a.dtype),
      inherit(variables["params"], spec))}
  params, served_spec = fold_lib.fold(inherited["params"], spec)
  assert isinstance(served_spec, InherSpec)
  flat = {"/".join(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
  folded = {p.rsplit("/", 1)[0] for p in flat if p.endswith("kernel") and "/down/" not in p
            and "/up/" not in p and "/gate/" not in p and not p.startswith(("stem", "embed", "head"))}
  gated = {p.split("/gate/")[0] for p in flat if "/gate/" in p}
  assert folded and gated and not folded & gated
  assert all(p.startswith(first.removesuffix("/.*")) for p in folded), folded
  assert any(p.startswith(second.removesuffix("/.*")) and "/down/" in p for p in flat)  # Kept.
  served = student.clone(spec=served_spec)
  want = _logits(student, inherited, x)
  got = _logits(served, {**inherited, "params": params}, x)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_always_folds_low_rank_layers_too():
  teacher, variables, x = _teacher("resnet8")
  spec = InherSpec(rank=0.25, heads=1, skip_if_no_saving=False)
  inherited = {**variables, "params": inherit(variables["params"], spec)}
  same, same_spec = fold_lib.fold(inherited, spec)  # Factorised is cheaper everywhere.
  assert same_spec == spec and _shapes(same) == _shapes(inherited)
  served_vars, served_spec = fold_lib.fold(inherited, spec, policy="always")
  assert _shapes(served_vars) == _shapes(variables)
  want = _logits(teacher.clone(spec=spec), inherited, x)
  chex.assert_trees_all_close(_logits(teacher.clone(spec=served_spec), served_vars, x), want,
                              rtol=1e-5, atol=1e-5)


def test_saves_flops_rule():
  assert saves_flops(144, 16, 16) and not saves_flops(144, 16, 4)
  assert saves_flops(3, 5, 2) and not saves_flops(100, 100, 25)


def test_bad_input_names_the_path():
  layer = InherDense(6, spec=InherSpec(rank=2, heads=1, skip_if_no_saving=False))
  x = jnp.ones((2, 7))
  params = jax.eval_shape(layer.init, KEY, x)["params"]
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), {"fc": params})
  spec = InherSpec(rank=2, heads=1, skip_if_no_saving=False)
  bad = {"fc": {**params["fc"], "down": {"kernel": jnp.zeros((7, 3))}}}
  with pytest.raises(ValueError, match=r"fc: down/kernel \(7, 3\) and up/kernel \(1, 2, 6\)"):
    fold_lib.fold(bad, spec)
  with pytest.raises(ValueError, match=r"fc: the params \(rank 2, 1 head\(s\)\) do not match"):
    fold_lib.fold(params, InherSpec(rank=3, heads=1, skip_if_no_saving=False))
  with pytest.raises(ValueError, match="fc: a factorised layer, but the model has no spec"):
    fold_lib.fold(params, None)
  with pytest.raises(TypeError, match="InherSpec or a model"):
    fold_lib.fold(params, "rank=2")
  with pytest.raises(TypeError, match="mapping"):
    fold_lib.fold([params], spec)
  with pytest.raises(ValueError, match="policy"):
    fold_lib.fold(params, spec, policy="sometimes")
