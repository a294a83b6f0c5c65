r"""torchvision ResNets' PyTorch weights -> `inhernet_jax.models.imagenet`'s variables.

Strict both ways, like every `inhernet_jax.interop.convert` family: every tensor the model needs
must be there, every tensor that is there must be used (BatchNorm's
``num_batches_tracked`` is ignored, see `convert_core.DEFAULT_IGNORE`), and the error
names each missing or unexpected key. Re-exported by `inhernet_jax.interop.convert`.

Example:
  ```python
  model, variables = convert.from_torchvision("resnet50.pth", "resnet50")
  logits = model.apply(variables, images_nhwc, train=False)
  ```
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from inhernet_jax.interop.state_dict import (_assemble, _dense_leaves, _ignore, _Leaf,
                                       abstract_variables, batch_norm_leaves, conv_leaves,
                                       load_state_dict, match_variables)
from inhernet_jax.models import imagenet

_TORCHVISION_HINT = (
    "save torchvision's weights where torchvision and the network are available, e.g. "
    "python -c \"import torch, torchvision; torch.save(torchvision.models.{arch}("
    "weights='IMAGENET1K_V2').state_dict(), '{arch}.pth')\" (IMAGENET1K_V1 for resnet18/34)")


def _resnet_arch(depth) -> str:
  arch = depth if isinstance(depth, str) else f"resnet{depth}"
  if arch not in imagenet.MODELS:
    raise ValueError(f"unknown torchvision ResNet {depth!r}; known: {', '.join(imagenet.MODELS)}")
  return arch


def _resnet_leaves(arch: str) -> list[_Leaf]:
  ctor = imagenet.MODELS[arch]
  stage_sizes, block = ctor.keywords["stage_sizes"], ctor.keywords["block_cls"]
  bottleneck = block is imagenet.Bottleneck

  conv, bn = conv_leaves, batch_norm_leaves
  leaves = conv(("stem",), "conv1") + bn(("bn_init",), "bn1")
  for i, size in enumerate(stage_sizes):
    for j in range(size):
      ours, theirs = f"layer{i + 1}_{j}", f"layer{i + 1}.{j}"
      for k in range(1, 4 if bottleneck else 3):
        leaves += conv((ours, f"conv{k}"), f"{theirs}.conv{k}")
        leaves += bn((ours, f"bn{k}"), f"{theirs}.bn{k}")
      if j == 0 and (i > 0 or bottleneck):  # Where the block's shape changes (both models).
        leaves += conv((ours, "proj_conv"), f"{theirs}.downsample.0")
        leaves += bn((ours, "proj_bn"), f"{theirs}.downsample.1")
  return leaves + _dense_leaves(("head",), "fc")


def _torchvision_resnet(state_dict, depth, ignore=None):
  arch = _resnet_arch(depth)
  return _assemble(load_state_dict(state_dict), _resnet_leaves(arch),
                   _ignore(ignore, "resnet"), f"torchvision {arch}")


def torchvision_resnet(state_dict, depth: int | str, *, ignore=None) -> dict:
  """``{"params", "batch_stats"}`` of `inhernet_jax.models.imagenet` from torchvision's.

  Args:
    state_dict: a torchvision ``resnet{depth}`` state dict (anything `load_state_dict`
      takes: a file or a mapping). Any width: the stem's channels become ``num_filters``.
    depth: 18, 34, 50, 101 or 152 (or ``"resnet50"``).
    ignore: regexes of PyTorch names to drop (default ``DEFAULT_IGNORE["resnet"]``).

  Raises:
    ConversionError: missing or unused tensors (by PyTorch name), or a tensor of the
      wrong rank.
  """
  return _torchvision_resnet(state_dict, depth, ignore)[0]


def from_torchvision(weights, arch: str | int = "resnet50", *, ignore=None):
  """``(model, variables)``: our ``arch`` teacher and torchvision's weights for it.

  Args:
    weights: a ``.pth`` / ``.safetensors`` file of ``torchvision.models.<arch>()``'s
      state dict, or the state dict itself.
    arch: ``"resnet18"`` ... ``"resnet152"`` (or the depth).
    ignore: see `torchvision_resnet`.

  Returns:
    `imagenet.ResNet` (``spec=None``, ``num_classes`` and ``num_filters`` read from the
    weights) and its ``{"params", "batch_stats"}``.
  """
  arch = _resnet_arch(arch)
  if isinstance(weights, (str, os.PathLike)) and not os.path.isfile(weights):
    raise FileNotFoundError(f"no weights file at {os.fspath(weights)}: "
                            + _TORCHVISION_HINT.format(arch=arch))
  variables, sources = _torchvision_resnet(weights, arch, ignore)
  params = variables["params"]
  model = imagenet.MODELS[arch](num_classes=params["head"]["kernel"].shape[-1],
                                num_filters=params["stem"]["kernel"].shape[-1])
  abstract = abstract_variables(model, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  return model, match_variables(variables, abstract, sources=sources)


__all__ = ["from_torchvision", "torchvision_resnet"]
