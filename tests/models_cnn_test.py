"""Tests for the CNN zoo: `inhernet_jax.models.cifar` and `inhernet_jax.models.imagenet`.

Parameter counts are pinned to PyTorch's ``sum(p.numel() for p in model.parameters())``
of the reference implementations (RepDistiller's CIFAR models with 100 classes,
torchvision's ResNets with 1000). Big models are only traced (`jax.eval_shape`); real
forward passes use tiny variants on 8x8 / 16x16 inputs, since XLA compiles dominate.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inhernet_jax import InherSpec
from inhernet_jax import inherit
from inhernet_jax.models import cifar, imagenet

# PyTorch reference counts (weights, biases, BatchNorm weight and bias; no running stats).
REFERENCE_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "imagenet/resnet18": 11_689_512,
    "imagenet/resnet34": 21_797_672,
    "imagenet/resnet50": 25_557_032,
    "imagenet/resnet101": 44_549_160,
    "imagenet/resnet152": 60_192_808,
}

# name -> (constructor, num_classes, input size).
ZOO = {
    **{name: (ctor, 100, 32) for name, ctor in cifar.MODELS.items()},
    **{f"imagenet/{name}": (ctor, 1000, 64) for name, ctor in imagenet.MODELS.items()},
}

# Reduced members of each family for real forward passes: (model, input size).
FAMILIES = {
    "cifar_resnet": (
        cifar.CifarResNet(stage_sizes=(1, 1, 1), num_filters=(8, 8, 16, 16), num_classes=10),
        8,
    ),
    "wrn": (
        cifar.WideResNet(stage_sizes=(1, 1, 1), num_filters=(8, 8, 16, 32), num_classes=10),
        8,
    ),
    "vgg": (cifar.VGG(cfg=((8,), (8, 16), (16,), (16,), (24,)), num_classes=10), 8),
    "imagenet_resnet": (
        imagenet.ResNet(
            stage_sizes=(1, 1), block_cls=imagenet.Bottleneck, num_filters=4, num_classes=10
        ),
        16,
    ),
}


def _shapes(tree):
  return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), tree)


def _count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _abstract_init(model, size):
  """``(logits, variables)`` as shapes only: traced, never compiled."""
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  init = functools.partial(model.init_with_output, train=False)
  return jax.eval_shape(init, jax.random.key(0), x)


def _images(size, seed=0):
  return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


def _eval(model, variables, x):
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def _kernel(rng, shape, decay=0.7):
  """A He-scaled kernel whose matrix has singular values ~ i**-decay, like trained ones."""
  m, n = int(np.prod(shape[:-1])), shape[-1]
  k = min(m, n)
  u = np.linalg.qr(rng.standard_normal((m, k)))[0]
  v = np.linalg.qr(rng.standard_normal((n, k)))[0]
  s = (1.0 + np.arange(k)) ** -decay
  s *= np.sqrt(2.0 * n) / np.linalg.norm(s)  # Frobenius norm of a He-initialised kernel.
  return ((u * s) @ v.T).reshape(shape).astype(np.float32)


def _trained_ish(abstract, seed=0):
  """Concrete host variables for an abstract ``{"params", "batch_stats"}`` tree: kernels
  with decaying spectra, non-trivial biases, BatchNorm affines and running statistics.
  No XLA compile (a jitted random init costs seconds per model on CPU)."""
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    name = str(path[-1].key)
    if name == "kernel":
      return _kernel(rng, a.shape)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
    return (0.1 * rng.standard_normal(a.shape)).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(leaf, abstract)


@functools.lru_cache(maxsize=None)
def _teacher(family):
  """A tiny teacher of ``family``, its variables, an input batch and its eval logits."""
  model, size = FAMILIES[family]
  x = _images(size)
  variables = _trained_ish(_abstract_init(model, size)[1])
  return model, variables, x, np.asarray(_eval(model, variables, x))


def _rel_error(y, ref) -> float:
  return float(np.linalg.norm(np.asarray(y) - ref) / np.linalg.norm(ref))


# ------------------------------------------------------------------------- zoo-wide
def test_zoo_names():
  assert set(ZOO) == set(REFERENCE_PARAMS)
  assert len(cifar.MODELS) == 18 and len(imagenet.MODELS) == 5


@pytest.mark.parametrize("name", sorted(ZOO))
def test_parameter_count_and_output_shape(name):
  ctor, classes, size = ZOO[name]
  logits, variables = _abstract_init(ctor(num_classes=classes), size)
  assert _count(variables["params"]) == REFERENCE_PARAMS[name]
  assert logits.shape == (2, classes)
  assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_inherited_tree_matches_model_and_keeps_batch_stats(name):
  ctor, classes, size = ZOO[name]
  teacher = ctor(num_classes=classes)
  _, abstract = _abstract_init(teacher, size)
  params = abstract["params"]
  # Names the presets rely on: one top-level "stem" conv and "head" Dense, no other
  # module anywhere named "stem", "head" or "embed".
  assert params["stem"]["kernel"].ndim == 4 and params["head"]["kernel"].ndim == 2
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    modules = [str(p.key) for p in path[:-1]]
    assert modules[0] != "embed" and not {"stem", "head", "embed"} & set(modules[1:]), path

  spec = InherSpec(rank=4, heads=2)
  if REFERENCE_PARAMS[name] <= 12_000_000:
    # Host arrays: inherit runs its NumPy path, nothing is compiled.
    rng = np.random.default_rng(0)
    concrete = jax.tree.map(lambda a: rng.standard_normal(a.shape, dtype=np.float32), params)
    inherited = inherit(concrete, spec)
  else:  # Same planning, traced only: big random teachers cost seconds each.
    inherited = jax.eval_shape(lambda p: inherit(p, spec), params)
  logits, student = _abstract_init(teacher.clone(spec=spec), size)
  assert _shapes(inherited) == _shapes(student["params"])
  assert _count(inherited) < _count(params)
  assert _shapes(student["batch_stats"]) == _shapes(abstract["batch_stats"])
  assert logits.shape == (2, classes)


# ----------------------------------------------------------------- real, tiny models
def _train_step(model, variables, x):
  return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x
  )


@pytest.mark.parametrize("name, size", [("resnet8", 8), ("wrn_16_1", 8), ("vgg8", 16)])
def test_tiny_models_init_train_and_eval(name, size):
  model = cifar.MODELS[name](num_classes=10)
  x = _images(size)
  # The "rbg" PRNG compiles faster on CPU than the default threefry.
  key = jax.random.key(1, impl="rbg")
  variables = jax.jit(functools.partial(model.init, train=False))(key, x)
  assert _count(variables["params"]) == _count(_abstract_init(model, size)[1]["params"])
  logits, updates = _train_step(model, variables, x)
  assert logits.shape == (2, 10) and bool(jnp.isfinite(logits).all())
  stats, old = updates["batch_stats"], variables["batch_stats"]
  assert _shapes(stats) == _shapes(old)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a != b).any()), stats, old)))
  logits = _eval(model, {"params": variables["params"], "batch_stats": stats}, x)
  assert logits.shape == (2, 10) and bool(jnp.isfinite(logits).all())


def test_wrn_dropout():
  model = cifar.WideResNet(
      stage_sizes=(1, 1, 1), num_filters=(4, 4, 8, 8), num_classes=3, dropout_rate=0.5
  )
  x = _images(8)
  variables = _trained_ish(_abstract_init(model, 8)[1])
  step = jax.jit(
      lambda v, x, key: model.apply(
          v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
      )[0]
  )
  y0 = step(variables, x, jax.random.key(0, impl="rbg"))
  y1 = step(variables, x, jax.random.key(1, impl="rbg"))
  assert y0.shape == (2, 3) and not np.allclose(y0, y1)
  assert _eval(model, variables, x).shape == (2, 3)  # No dropout rng needed.


# ------------------------------------------------------------------------ inheritance
def _inherited_error(family, spec):
  """Relative error of the inherited network's eval logits against the teacher's."""
  model, variables, x, ref = _teacher(family)
  new = inherit(variables["params"], spec)
  # The teacher's BatchNorm statistics, unchanged.
  y = _eval(model.clone(spec=spec), {"params": new, "batch_stats": variables["batch_stats"]}, x)
  return _rel_error(y, ref), new


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_error_shrinks_with_rank_and_full_rank_is_exact(family):
  errors = []
  for fraction in (0.25, 0.5, 1.0):
    spec = InherSpec(rank=fraction, heads=1, skip_if_no_saving=False)
    errors.append(_inherited_error(family, spec)[0])
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] <= 1e-5, errors  # H = 1 at full rank.


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_rank_inheritance_with_gated_heads_is_exact(family):
  error, new = _inherited_error(family, InherSpec(rank=1.0, heads=3, skip_if_no_saving=False))
  assert "gate" in new["stem"] and "gate" in new["head"]  # Everything is factorised.
  assert error <= 1e-5


def test_inherited_model_trains_from_teacher_batch_stats():
  model, variables, x, _ = _teacher("cifar_resnet")
  spec = InherSpec(rank=2, heads=3)
  student = model.clone(spec=spec)
  new = inherit(variables["params"], spec)
  y, updates = _train_step(student, {**variables, "params": new}, x)
  assert bool(jnp.isfinite(y).all())
  assert _shapes(updates["batch_stats"]) == _shapes(variables["batch_stats"])
