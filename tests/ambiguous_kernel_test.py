"""Plain `inherit` (no model) on kernels whose layout the params do not tell (issue 26).

A bias-free multi-axis DenseGeneral kernel or a bias-free scan-stacked kernel would be
factorised as the wrong matrix: `inherit` warns, naming the path and the fix
(`inherit_model`, a ``stack`` rule); a declared layout, `inherit_model` and the model
zoo stay quiet.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import inhernet_jax as ij
from inhernet_jax import models
from inhernet_jax.decomposition import plan as plan_lib
from inhernet_jax.decomposition.plan import AmbiguousKernelWarning

W = 32


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=4, use_bias=False, name="attn")(x, x)


def _attention():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, W)), jnp.float32)
  model = Attention()
  return model, model.init(jax.random.key(0), x), x


def _quiet(fn, *args, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("error", AmbiguousKernelWarning)
    return fn(*args, **kwargs)


def test_bias_free_attention_query_kernel_warns_with_the_fix():
  _, variables, _ = _attention()
  assert variables["params"]["attn"]["query"]["kernel"].shape == (W, 4, W // 4)
  with pytest.warns(AmbiguousKernelWarning) as record:
    ij.inherit(variables["params"], 4)
  (message,) = [str(w.message) for w in record if w.category is AmbiguousKernelWarning]
  assert f"attn/query/kernel {(W, 4, W // 4)}" in message
  assert "inherit_model" in message and "'stack'" in message


def test_inherit_model_reads_the_same_kernels_without_warning():
  model, variables, x = _attention()
  _, new = _quiet(ij.inherit_model, model, variables, 4, x)
  down = new["params"]["attn"]["query"]["down"]["kernel"]
  assert down.shape[0] == W  # Read as W x W (heads * head_dim outputs), not (W * 4) x 8.


def test_bias_free_stacked_kernel_warns_and_a_stack_rule_declares_it():
  params = {"layers": {"fc": {"kernel": np.random.default_rng(1).standard_normal((3, 12, 12)).astype(np.float32)}}}
  with pytest.warns(AmbiguousKernelWarning, match=r"layers/fc/kernel \(3, 12, 12\)"):
    ij.inherit(params, 3)
  rule = ((r"layers/fc/kernel", {"stack": 1}),)
  out = _quiet(ij.inherit, params, ij.InherSpec(rank=3, rules=rule))
  assert out["layers"]["fc"]["down"]["kernel"].shape == (3, 12, 3)
  _quiet(ij.inherit, params, ij.InherSpec(rank=3, rules=((r"layers/fc/kernel", {"stack": 0}),)))
  _quiet(ij.inherit, params, ij.InherSpec(rank=3, rules=((r"layers/fc/kernel", "skip"),)))


@pytest.mark.parametrize("shape,unclear", [
    ((3, 3, 16, 32), False),     # 2-D conv.
    ((1, 1, 64, 32), False),     # 1x1 conv.
    ((2, 64, 4, 16), True),      # Stacked multi-axis DenseGeneral.
    ((64, 4, 16), True),         # Multi-axis DenseGeneral / 1-D conv / stacked Dense.
    ((3, 3, 3, 8, 8), True),     # 3-D conv or stacked 2-D conv.
    ((64, 32), False),
])
def test_which_bias_free_shapes_are_ambiguous(shape, unclear):
  assert plan_lib.ambiguous(shape) is unclear


def test_kernels_with_a_bias_are_read_from_it():
  rng = np.random.default_rng(2)
  params = {"fc": {"kernel": rng.standard_normal((3, 12, 12)).astype(np.float32),
                   "bias": np.zeros((3, 12), np.float32)}}
  out = _quiet(ij.inherit, params, 3)
  assert out["fc"]["down"]["kernel"].shape == (3, 12, 3)


@pytest.mark.parametrize("name,kwargs", [("resnet8", {}), ("wrn_16_1", {}), ("vgg8", {}),
                                         ("efficientnet_lite0", {}), ("cnn", {}),
                                         ("vit_ti16", {"scan": True})])
def test_zoo_kernels_are_not_ambiguous(name, kwargs):
  """(Every zoo model, scan variants included, was checked once; these cover each kind.)"""
  shapes = models.variable_shapes(models.create(name, **kwargs), name)["params"]
  kernels = _quiet(plan_lib.collect, shapes, ij.InherSpec(rank=4), abstract=True)
  assert kernels
