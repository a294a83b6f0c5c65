"""Tests for `inhernet_jax.models.transformer` and `inhernet_jax.models.small`.

Full-size models are only traced (``jax.eval_shape``): parameter counts, output shapes
and the inherited pytree's structure cost no compute. Real forward passes and
inheritance run on tiny variants (width 32, depth 2, 2 attention heads) whose teacher
weights are random NumPy arrays (init leaves biases and norms at 0 / 1, which hides bugs).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from inhernet_jax import InherSpec
from inhernet_jax import inherit
from inhernet_jax.models import small, transformer

MODELS = {**transformer.MODELS, **small.MODELS}

_IMAGE = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
_TOKENS = jax.ShapeDtypeStruct((1, 8), jnp.int32)
_DIGITS = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
# name -> (constructor kwargs, example input, output shape).
FULL = {
    "vit_ti16": ({"num_classes": 1000}, _IMAGE, (1, 1000)),
    "vit_s16": ({"num_classes": 1000}, _IMAGE, (1, 1000)),
    "vit_b16": ({"num_classes": 1000}, _IMAGE, (1, 1000)),
    "vit_b32": ({"num_classes": 1000}, _IMAGE, (1, 1000)),
    "bert_base": ({"num_classes": 2}, _TOKENS, (1, 2)),
    "gpt2_small": ({}, _TOKENS, (1, 8, 50257)),
    "mlp": ({"num_classes": 10}, _DIGITS, (1, 10)),
    "cnn": ({"num_classes": 10}, _DIGITS, (1, 10)),
}

# Exact parameter counts of the default configurations (1000 classes for ViT, 2 for BERT).
# ViT uses 'gap' pooling: no class token and one position embedding fewer than the
# cls-token models of big_vision / timm (86,567,656 for ViT-B/16), i.e. 2 * width less.
# BERT: HF BertModel (token types, pooler) is 109,482,240; + head 768 * 2 + 2.
# GPT-2: 124,439,808 with the head tied; untied bias-free head + 50257 * 768.
PINNED = {
    "vit_ti16": 5_717_032,  # timm vit_tiny_patch16_224 5,717,416 - 2 * 192
    "vit_s16": 22_049_896,  # timm vit_small_patch16_224 22,050,664 - 2 * 384
    "vit_b16": 86_566_120,  # 86,567,656 - 2 * 768
    "vit_b32": 88_222_696,  # timm vit_base_patch32_224 88,224,232 - 2 * 768
    "bert_base": 109_483_778,  # 109,482,240 + 1,538
    "gpt2_small": 163_037_184,  # 124,439,808 + 38,597,376
    "mlp": 50_826,
    "cnn": 151_306,  # the README quick start's teacher
}


def _dense(m, n, bias=True):
  return m * n + (n if bias else 0)


def _block(width, mlp):
  """One transformer block: q, k, v, out, fc1, fc2 (all with bias), two LayerNorms."""
  return 4 * _dense(width, width) + _dense(width, mlp) + _dense(mlp, width) + 2 * 2 * width


def _formula(name):
  """Parameter counts written out layer by layer (independent of the model code)."""
  if name.startswith("vit"):
    width, depth, _, mlp = transformer._VIT[{"ti": "Ti", "s": "S", "b": "B"}[name[4:-2]]]
    patch = int(name[-2:])
    return (
        _dense(patch * patch * 3, width)  # embed conv
        + (224 // patch) ** 2 * width  # pos_embed
        + depth * _block(width, mlp)
        + 2 * width  # final LayerNorm
        + _dense(width, 1000)  # head
    )
  if name == "bert_base":
    return (
        (30522 + 512 + 2) * 768  # token, position, type embeddings
        + 2 * 768  # embedding LayerNorm
        + 12 * _block(768, 3072)
        + _dense(768, 768)  # pooler
        + _dense(768, 2)  # head
    )
  if name == "gpt2_small":
    return (50257 + 1024) * 768 + 12 * _block(768, 3072) + 2 * 768 + _dense(768, 50257, False)
  if name == "mlp":
    return _dense(64, 256) + _dense(256, 128) + _dense(128, 10)
  if name == "cnn":
    return _dense(9, 32) + _dense(9 * 32, 64) + _dense(4 * 4 * 64, 128) + _dense(128, 10)
  raise KeyError(name)


def _size(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(tree):
  return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


def _init_shapes(model, x):
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def test_registry_has_every_model():
  assert set(MODELS) == set(FULL) == set(PINNED)


def test_formula_matches_published_counts():
  # The formula reproduces the published cls-token / tied-head / BertModel counts.
  assert _formula("vit_b16") + 2 * 768 == 86_567_656
  assert _formula("gpt2_small") - 50257 * 768 == 124_439_808
  assert _formula("bert_base") - _dense(768, 2) == 109_482_240


@pytest.mark.parametrize("name", sorted(FULL))
def test_param_count_and_output_shape(name):
  kwargs, x, out_shape = FULL[name]
  model = MODELS[name](**kwargs)
  params = _init_shapes(model, x)
  assert _size(params) == PINNED[name] == _formula(name)
  out = jax.eval_shape(functools.partial(model.apply, train=False), {"params": params}, x)
  assert out.shape == out_shape and out.dtype == jnp.float32
  if name in transformer.MODELS:  # Scanning stacks the same params.
    scanned = _init_shapes(model.clone(scan=True), x)
    assert _size(scanned) == PINNED[name]
    assert _flat(scanned)["blocks/attn/query/kernel"].shape == (12, model.width, model.width)
    assert _flat(params)["block_11/mlp/fc1/bias"].shape == (model.mlp_dim,)


def test_vit_class_token_pooling():
  # pool_type="tok" (HF / timm / the original ViT): a class token with its own position.
  model = MODELS["vit_b16"](num_classes=1000, pool_type="tok", norm_eps=1e-12)
  params = _flat(_init_shapes(model, _IMAGE))
  assert _size(params) == 86_567_656  # timm's vit_base_patch16_224.
  assert (params["cls"].shape, params["pos_embed"].shape) == ((1, 1, 768), (1, 197, 768))
  with pytest.raises(ValueError, match="pool_type must be 'gap' or 'tok', got 'cls'"):
    _init_shapes(model.clone(pool_type="cls"), _IMAGE)


def test_naming_convention():
  names = {
      name: set(_flat(_init_shapes(MODELS[name](**kw), x)))
      for name, (kw, x, _) in FULL.items()
      if name in ("vit_ti16", "bert_base", "gpt2_small", "cnn")
  }
  assert {"embed/kernel", "pos_embed", "head/kernel"} <= names["vit_ti16"]
  assert {"embed/embedding", "pos_embed", "head/kernel"} <= names["bert_base"]
  assert {"embed/embedding", "pos_embed", "head/kernel"} <= names["gpt2_small"]
  assert "head/bias" not in names["gpt2_small"]
  assert {"stem/kernel", "head/kernel"} <= names["cnn"]


# The full-size inherited structure, traced: `inherit` under eval_shape runs its jnp path
# abstractly (no SVD, no compile). The host (NumPy) path is checked by the tests below.
@pytest.mark.parametrize(
    "name,scan", [(n, False) for n in FULL] + [(n, True) for n in transformer.MODELS]
)
def test_inherit_structure_full_size(name, scan):
  kwargs, x, _ = FULL[name]
  model = MODELS[name](**kwargs, **({"scan": True} if scan else {}))
  rules = ((r"head/kernel", {"rank": 8, "heads": 1}),)
  if name in transformer.MODELS:  # Rules see the same paths inside and outside nn.scan.
    rules += ((r"(blocks|block_\d+)/attn/query/kernel", "skip"),)
  spec = InherSpec(rank=4, heads=2, rules=rules)
  teacher = _init_shapes(model, x)
  inherited = jax.eval_shape(lambda p: inherit(p, spec), teacher)
  expected = _init_shapes(model.clone(spec=spec), x)
  assert _shapes(inherited) == _shapes(expected)
  flat = _flat(inherited)
  if name == "bert_base":  # 768 x 2: rank 8 >= full rank, kept.
    assert flat["head/kernel"].shape == (768, 2)
  else:
    assert flat["head/up/kernel"].shape[:2] == (1, 8)
  if scan:
    assert flat["blocks/attn/key/up/kernel"].shape == (12, 2, 4, model.width)
    assert flat["blocks/mlp/fc1/gate/kernel"].shape == (12, 4, 2)
    assert flat["blocks/attn/query/kernel"].shape == (12, model.width, model.width)
  elif name in transformer.MODELS:
    assert flat["block_0/attn/query/kernel"].shape == (model.width, model.width)


# Real inheritance on the host (NumPy) of full-width models, reduced to keep the SVDs
# quick: scan-stacked with one layer, GPT-2's vocabulary (LM head) cut to 1000.
@pytest.mark.parametrize("name", ["vit_b16", "bert_base", "gpt2_small"])
def test_inherit_structure_full_width_host(name):
  kwargs, x, _ = FULL[name]
  kwargs = {**kwargs, "vocab_size": 1000} if name == "gpt2_small" else kwargs
  model = MODELS[name](**kwargs, depth=1, scan=True)
  rng = np.random.default_rng(0)

  def fill(path, s):  # Random kernels; other leaves are not decomposed.
    if jax.tree_util.keystr(path).endswith("['kernel']"):
      return rng.standard_normal(s.shape, dtype=np.float32)
    return np.zeros(s.shape, s.dtype)

  teacher = jax.tree_util.tree_map_with_path(fill, _init_shapes(model, x))
  spec = InherSpec(rank=4, heads=2)
  assert _shapes(inherit(teacher, spec)) == _shapes(_init_shapes(model.clone(spec=spec), x))


# ------------------------------------------------------------------- tiny variants
_TINY = {"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64}
_RNG = np.random.default_rng(0)
# family -> (teacher constructor, input, output shape).
TINY = {
    "vit": (
        functools.partial(transformer.ViT, num_classes=10, patch_size=4, **_TINY),
        jnp.asarray(_RNG.standard_normal((2, 8, 8, 3)), jnp.float32),
        (2, 10),
    ),
    "bert": (
        functools.partial(
            transformer.BertClassifier, num_classes=3, vocab_size=50, max_len=16, **_TINY
        ),
        jnp.asarray(_RNG.integers(0, 50, (2, 6)), jnp.int32),
        (2, 3),
    ),
    "gpt": (
        functools.partial(transformer.GPT, vocab_size=50, max_len=16, **_TINY),
        jnp.asarray(_RNG.integers(0, 50, (2, 6)), jnp.int32),
        (2, 6, 50),
    ),
    "mlp": (
        functools.partial(small.MLP, hidden=(24, 16)),
        jnp.asarray(_RNG.standard_normal((4, 8, 8, 1)), jnp.float32),
        (4, 10),
    ),
    "cnn": (
        functools.partial(small.CNN, widths=(8, 12, 16)),
        jnp.asarray(_RNG.standard_normal((4, 8, 8, 1)), jnp.float32),
        (4, 10),
    ),
}
_TRANSFORMERS = ("vit", "bert", "gpt")
_BOTH = [(f, False) for f in TINY] + [(f, True) for f in _TRANSFORMERS]


def _model(family, scan, **kwargs):
  return TINY[family][0](**({"scan": True} if scan else {}), **kwargs)


def _random_teacher(model, x, seed):
  """Random params (NumPy, no init compile); other leaves than kernels are O(1).

  Every kernel slice has random singular vectors and a decaying spectrum
  ``s_i ~ exp(-4 i / min(m, n))`` (Gaussian kernels have flat spectra: the logits' error
  is then large and noisy at any rank below full), scaled to the Frobenius norm of a
  ``N(0, 1/fan_in)`` matrix.
  """
  rng = np.random.default_rng(seed)

  def kernel(shape, stack):
    m, n = int(np.prod(shape[stack:-1])), shape[-1]
    u, _, vt = np.linalg.svd(rng.standard_normal((*shape[:stack], m, n)), full_matrices=False)
    s = np.exp(-4 * np.arange(min(m, n)) / min(m, n))
    s *= np.sqrt(n / np.square(s).sum())
    return ((u * s) @ vt).reshape(shape)

  def fill(path, leaf):
    keys = [getattr(k, "key", None) for k in path]
    if keys[-1] == "kernel":
      value = kernel(leaf.shape, stack=int("blocks" in keys))  # Scan layer axis.
    elif keys[-1] == "scale":
      value = 1 + 0.2 * rng.standard_normal(leaf.shape)
    else:
      value = (0.2 if keys[-1] == "bias" else 1.0) * rng.standard_normal(leaf.shape)
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _init_shapes(model, x))


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("family,scan", _BOTH)
def test_tiny_init_and_forward(family, scan):
  _, x, out_shape = TINY[family]
  # Dropout where it is hardest (per-layer dropout keys under scan); it costs compile time.
  dropout = scan and family in _TRANSFORMERS
  model = _model(family, scan, **({"dropout_rate": 0.1} if dropout else {}))

  @jax.jit  # One compile for everything; "rbg" keys compile faster than threefry.
  def run(x):
    params = model.init(jax.random.key(0, impl="rbg"), x)["params"]
    rngs = {"dropout": jax.random.key(1, impl="rbg")}
    train = model.apply({"params": params}, x, train=True, rngs=rngs)
    evaluate = model.apply({"params": params}, x, train=False)
    return params, train, evaluate

  params, train, evaluate = run(x)
  assert _shapes(params) == _shapes(_init_shapes(model, x))
  if scan:
    assert _flat(params)["blocks/attn/query/kernel"].shape == (2, 32, 32)
    # Each layer gets its own init.
    assert not np.allclose(*_flat(params)["blocks/attn/query/kernel"])
  for y in (train, evaluate):
    assert y.shape == out_shape and y.dtype == jnp.float32
    assert np.isfinite(np.asarray(y)).all()
  if dropout:  # Active in training only.
    assert not np.allclose(train, evaluate)
  else:
    np.testing.assert_allclose(train, evaluate, rtol=1e-6, atol=1e-6)
  if family == "gpt":  # Causal: changing the last token changes only the last position.
    _, _, other = run(x.at[:, -1].set((x[:, -1] + 1) % 50))
    np.testing.assert_allclose(other[:, :-1], evaluate[:, :-1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(other[:, -1], evaluate[:, -1])


def test_bert_padding_mask_and_token_types():
  model, x = _model("bert", False), TINY["bert"][1]
  params = _random_teacher(model, x, seed=1)
  apply = jax.jit(functools.partial(model.apply, train=False))
  mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  padded = x.at[0, 4:].set(7)
  a = apply({"params": params}, x, mask=mask, token_types=jnp.zeros_like(x))
  b = apply({"params": params}, padded, mask=mask, token_types=jnp.zeros_like(x))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # Padding is not attended to.
  c = apply({"params": params}, x, mask=mask, token_types=jnp.ones_like(x))
  assert not np.allclose(a, c)


# Full rank is exact for any number of heads (each head is S V^T, the gate sums to one);
# below it the error shrinks with the rank (one head: with H heads the inherited layer
# is the same truncation, and each new gate shape costs `inherit` a compile).
# One compile for the teacher and all students.
_SPECS = {
    (1.0, 1): InherSpec(rank=1.0, heads=1, skip_if_no_saving=False),
    (1.0, 3): InherSpec(rank=1.0, heads=3, skip_if_no_saving=False),
    (0.5, 1): InherSpec(rank=0.5, heads=1, skip_if_no_saving=False),
    (0.25, 1): InherSpec(rank=0.25, heads=1, skip_if_no_saving=False),
}


@pytest.mark.parametrize("family,scan", _BOTH)
def test_inheritance_error_vs_rank(family, scan):
  model, x = _model(family, scan), TINY[family][1]
  teacher = _random_teacher(model, x, seed=2)
  students = {}
  for key, spec in _SPECS.items():
    if scan and key[0] < 1:  # The rank sweep once per family (compile time).
      continue
    params = inherit(teacher, spec)
    assert _shapes(params) == _shapes(_init_shapes(model.clone(spec=spec), x)), key
    flat = _flat(params)
    assert flat["head/up/kernel"].shape[0] == key[1]
    assert ("head/gate/kernel" in flat) == (key[1] > 1)
    students[key] = params

  @jax.jit
  def logits(teacher, students, x):
    def apply(spec, params):
      return model.clone(spec=spec).apply({"params": params}, x, train=False)

    return apply(None, teacher), {k: apply(_SPECS[k], p) for k, p in students.items()}

  expected, out = logits(teacher, students, x)
  errors = {k: _rel_err(y, expected) for k, y in out.items()}
  assert errors[1.0, 1] < 1e-5 and errors[1.0, 3] < 1e-5, errors
  if not scan:
    assert errors[0.25, 1] > errors[0.5, 1] > 1e-3, errors


def test_self_attention_matches_flax_reference():
  """Separate query/key/value/out Dense == `nn.MultiHeadDotProductAttention` with the
  same weights (its DenseGeneral kernels are the reshaped Dense kernels)."""
  width, heads = 8, 2
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, width)), jnp.float32)
  mask = jnp.tril(jnp.ones((5, 5), bool))
  ours = transformer.SelfAttention(heads)
  params = _random_teacher(ours, x, seed=5)
  ref = nn.MultiHeadDotProductAttention(heads, qkv_features=width)
  ref_params = {
      name: {
          "kernel": params[name]["kernel"].reshape(width, heads, -1),
          "bias": params[name]["bias"].reshape(heads, -1),
      }
      for name in ("query", "key", "value")
  }
  ref_params["out"] = {
      "kernel": params["out"]["kernel"].reshape(heads, -1, width),
      "bias": params["out"]["bias"],
  }

  @jax.jit
  def both(x):
    return (
        ours.apply({"params": params}, x, mask, train=False),
        ref.apply({"params": ref_params}, x, mask=mask),
    )

  a, b = both(x)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
