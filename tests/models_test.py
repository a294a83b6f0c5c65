"""The model registry: names, presets, and 'InherNet at a named student's size'."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import inhernet_jax as ij
from inhernet_jax import models
from inhernet_jax.decomposition import accounting

# Reduced members of every family (same code paths, small enough to inherit for real).
TINY = {
    "resnet8": dict(num_filters=(4, 4, 8, 8)),
    "wrn_16_1": {},
    "vgg8": {},
    "resnet18": dict(num_filters=4),
    "resnet50": dict(num_filters=4, stage_sizes=(1, 1, 1, 1)),
    "vit_ti16": dict(width=16, depth=2, num_heads=2, mlp_dim=32),
    "bert_base": dict(vocab_size=50, width=16, depth=2, num_heads=2, mlp_dim=32, max_len=32),
    "gpt2_small": dict(vocab_size=50, width=16, depth=2, num_heads=2, mlp_dim=32, max_len=32),
    "mlp": dict(hidden=(16, 8)),
    "cnn": dict(widths=(4, 8, 16)),
}


def _random_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def _paths(tree):
  return ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_names_cover_the_issue_list():
  expected = (
      "resnet8 resnet14 resnet20 resnet32 resnet44 resnet56 resnet110 resnet8x4 resnet32x4 "
      "wrn_16_1 wrn_16_2 wrn_40_1 wrn_40_2 vgg8 vgg11 vgg13 vgg16 vgg19 resnet18 resnet34 "
      "resnet50 resnet101 resnet152 vit_ti16 vit_s16 vit_b16 bert_base gpt2_small mlp cnn"
  ).split()
  assert set(expected) <= set(models.NAMES)


def test_unknown_name_and_preset_are_clear_errors():
  with pytest.raises(ValueError, match="unknown model 'resnet9'"):
    models.create("resnet9")
  with pytest.raises(ValueError, match="unknown preset"):
    models.preset("most", "resnet8")


_SCANNED = [(n, True) for n in models.NAMES if models.family(n) == "transformer"]


@functools.lru_cache(maxsize=None)
def _teacher(name, scan):
  """A full-size zoo model and its params' shapes (traced once for all three presets)."""
  model = models.create(name, **({"scan": True} if scan else {}))
  return model, models.variable_shapes(model, name)["params"]


@pytest.mark.parametrize("name, scan", [(n, False) for n in models.NAMES] + _SCANNED)
@pytest.mark.parametrize("which", models.PRESETS)
def test_every_preset_of_every_model(name, scan, which):
  """Presets are rules on kernel paths: each must match something (no silent no-ops),
  stems/heads/embeddings/pooler are kept by `default`, only the head by `demo`; and the
  inherited tree has the structure of ``clone(spec).init`` (traced: full-size models),
  scan-stacked transformers included."""
  model, shapes = _teacher(name, scan)
  kernels = [p for p in _paths(shapes) if p.endswith("/kernel")]
  rules = models.preset(which, name)
  for pattern, _ in rules:
    assert any(re.fullmatch(pattern, p) for p in kernels), (name, pattern)
  spec = ij.InherSpec(rank=4, rules=rules)
  # Every preset keeps EfficientNet's depthwise convs (`efficientnet.DEPTHWISE_RULE`).
  kept = [p for p in kernels if spec.match(p)[1].get("skip") and not p.endswith("depthwise/kernel")]
  top = {p.split("/")[0] for p in kept}
  if which == "all":
    assert not kept
  elif which == "demo":
    assert top == {"head"}
  else:
    assert "head" in top and not any(re.match(r"block_\d+|blocks", t) for t in top)
    assert top <= {"stem", "head", "embed", "pooler"}
  spec = spec.replace(heads=2)
  inherited = jax.eval_shape(functools.partial(ij.inherit, rank=spec), shapes)
  expected = models.variable_shapes(model.clone(spec=spec), name)["params"]
  as_struct = lambda t: jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), t)
  assert as_struct(inherited) == as_struct(expected)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("which", models.PRESETS)
def test_preset_structure_equals_inherited_tree(name, which):
  model = models.create(name, **TINY[name])
  shapes = models.variable_shapes(model, name)
  spec = ij.InherSpec(rank=2, heads=2, rules=models.preset(which, name))
  inherited = ij.inherit(_random_params(shapes["params"]), spec)
  expected = models.variable_shapes(model.clone(spec=spec), name)
  as_struct = lambda t: jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), t)
  assert as_struct(inherited) == as_struct(expected["params"])
  # Non-param collections (BatchNorm statistics) are the teacher's, unchanged.
  rest = lambda v: {k: c for k, c in v.items() if k != "params"}
  assert as_struct(rest(expected)) == as_struct(rest(shapes))


def test_inherit_at_a_named_students_size():
  """resnet32x4 inherited at most at resnet8x4's size: one call, exact count."""
  teacher = models.create("resnet32x4")
  params = _random_params(models.variable_shapes(teacher, "resnet32x4")["params"])
  target = models.param_count("resnet8x4")
  rules = models.preset("default", "resnet32x4")
  for heads in (1, 3):
    rank = accounting.rank_for_params(params, target, heads=heads, rules=rules)
    spec = ij.InherSpec(rank=rank, heads=heads, rules=rules)
    size = models.param_count("resnet32x4", spec=spec)
    assert size <= target < models.param_count("resnet32x4", spec=spec.replace(rank=rank + 1))
    assert size == ij.planned_param_count(params, spec)


def test_forward_flops_of_named_models_shrink_when_inherited():
  teacher = models.forward_flops("cnn")
  spec = ij.InherSpec(rank=4, rules=models.preset("default", "cnn"))
  inherited = models.forward_flops("cnn", spec=spec)
  # The fc layer alone: 2 * 512 * 128 multiply-adds in the teacher.
  assert teacher > 2 * 512 * 128
  assert 0 < inherited < teacher
