"""The CIFAR knowledge-distillation benchmark zoo (RepDistiller), built from InherNet layers.

Architectures, names and parameter counts follow RepDistiller (HobbitLong/RepDistiller,
``models/{resnet,wrn,vgg}.py``), the benchmark the paper's CIFAR-100 table uses:

* ``resnet{8,14,20,32,44,56,110}``, ``resnet8x4``, ``resnet32x4``: `CifarResNet`, a 3x3
  stem, three stages of ``(depth - 2) / 6`` `BasicBlock`s (strides 1, 2, 2), a 1x1 conv +
  BatchNorm shortcut where the shape changes, global average pooling, Dense classifier.
* ``wrn_{16,40}_{1,2}``: `WideResNet` (pre-activation blocks, ``(depth - 4) / 6`` per
  stage, widths ``16k, 32k, 64k``).
* ``vgg{8,11,13,16,19}``: `VGG` with BatchNorm (RepDistiller's ``vgg*_bn``): five conv
  blocks, a 2x2 max-pool after the first three (and after the fourth for 64x64 inputs),
  global average pooling and a single Dense ``512 -> num_classes``.

Parameter counts (``params`` collection: kernels, biases, BatchNorm scale and bias) equal
PyTorch's ``sum(p.numel() for p in model.parameters())``, e.g. 861,620 for resnet56 with
100 classes. The global average pool stands in for RepDistiller's fixed ``AvgPool2d(8)``
(the same on 32x32 inputs) so that smaller inputs work too.

Every conv and the classifier are `InherConv` / `InherDense`: ``spec=None`` is the plain
teacher, ``model.clone(spec=s)`` the inherited network whose params come from
``inherit(teacher_params, s)``; BatchNorm statistics carry over unchanged. The first
conv is named ``"stem"``, the classifier ``"head"``.

Example:
  ```python
  teacher = resnet32x4(num_classes=100)
  student = teacher.clone(spec=InherSpec(rank=8, heads=3))
  ```
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from inhernet_jax.layers.linen import InherConv
from inhernet_jax.models.imagenet import (BasicBlock, ResidualBlock, batch_norm, classifier_head,
                                         model_conv, residual_stages)
from inhernet_jax.decomposition.spec import InherSpec

ModuleDef = Any


def _check_widths(model) -> None:
  if len(model.num_filters) != len(model.stage_sizes) + 1:
    raise ValueError(
        f"num_filters needs a stem width and one width per stage, got {model.num_filters} "
        f"for stage_sizes={model.stage_sizes}"
    )


# --------------------------------------------------------------------------- ResNet
class CifarResNet(nn.Module):
  """RepDistiller's CIFAR ResNet.

  Attributes:
    stage_sizes: blocks per stage (``(n, n, n)``, ``n = (depth - 2) / 6``).
    num_classes: classifier outputs.
    spec: `InherSpec` of the inherited network, or None for the teacher.
    num_filters: stem width, then one width per stage (RepDistiller's ``num_filters``).
    block_cls: residual block (`BasicBlock`).
    dtype: computation dtype.
    act: activation.
    conv: conv class; must accept ``spec`` (`InherConv`).
  """

  stage_sizes: Sequence[int]
  num_classes: int
  spec: InherSpec | None = None
  num_filters: Sequence[int] = (16, 16, 32, 64)
  block_cls: ModuleDef = BasicBlock
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = InherConv

  @nn.compact
  def __call__(self, x, train: bool = True):
    """Logits ``(batch, num_classes)`` for NHWC images ``x``."""
    _check_widths(self)
    conv = model_conv(self, use_bias=False)
    norm = batch_norm(train, self.dtype)
    x = conv(self.num_filters[0], (3, 3), padding=1, name="stem")(x)
    x = self.act(norm(name="bn_init")(x))
    x = residual_stages(x, self.stage_sizes, self.num_filters[1:], self.block_cls, conv=conv,
                        norm=norm, act=self.act)
    return classifier_head(self, x)


def _resnet(depth: int, num_filters=(16, 16, 32, 64)):
  if (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
  n = (depth - 2) // 6
  return functools.partial(CifarResNet, stage_sizes=(n, n, n), num_filters=num_filters)


resnet8 = _resnet(8)
resnet14 = _resnet(14)
resnet20 = _resnet(20)
resnet32 = _resnet(32)
resnet44 = _resnet(44)
resnet56 = _resnet(56)
resnet110 = _resnet(110)
resnet8x4 = _resnet(8, (32, 64, 128, 256))
resnet32x4 = _resnet(32, (32, 64, 128, 256))


# --------------------------------------------------------------------- Wide ResNet
class WideBasicBlock(ResidualBlock):
  """Pre-activation wide block (RepDistiller ``wrn.BasicBlock``).

  BN-ReLU precedes each conv. Where the shape changes the shortcut is a 1x1 conv of the
  *activated* input (no BatchNorm of its own), otherwise the identity of the raw input.

  Attributes:
    filters, conv, norm, act, strides: as `ResidualBlock`'s (``strides``: of the first
      conv and of the shortcut conv).
    dropout: a `nn.Dropout` constructor between the convs, or None.
  """

  dropout: ModuleDef | None = None

  @nn.compact
  def __call__(self, x):
    pre = self.act(self.norm(name="bn1")(x))
    if self.strides == 1 and x.shape[-1] == self.filters:
      shortcut = x
    else:
      shortcut = self.conv(self.filters, (1, 1), self.strides, padding=0, name="shortcut")(pre)
    y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv1")(pre)
    y = self.act(self.norm(name="bn2")(y))
    if self.dropout is not None:
      y = self.dropout()(y)
    y = self.conv(self.filters, (3, 3), padding=1, name="conv2")(y)
    return shortcut + y


class WideResNet(nn.Module):
  """RepDistiller's Wide ResNet (WRN-d-k).

  Attributes:
    stage_sizes: blocks per stage (``(n, n, n)``, ``n = (depth - 4) / 6``).
    num_classes: classifier outputs.
    spec: `InherSpec` of the inherited network, or None for the teacher.
    num_filters: stem width, then one width per stage (``16, 16k, 32k, 64k``).
    dropout_rate: dropout between a block's convs (RepDistiller: 0); needs a
      ``"dropout"`` rng in training when positive.
    dtype: computation dtype.
    act: activation.
    conv: conv class; must accept ``spec`` (`InherConv`).
  """

  stage_sizes: Sequence[int]
  num_classes: int
  spec: InherSpec | None = None
  num_filters: Sequence[int] = (16, 16, 32, 64)
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = InherConv

  @nn.compact
  def __call__(self, x, train: bool = True):
    """Logits ``(batch, num_classes)`` for NHWC images ``x``."""
    _check_widths(self)
    conv = model_conv(self, use_bias=False)
    norm = batch_norm(train, self.dtype)
    dropout = None
    if self.dropout_rate > 0:
      dropout = functools.partial(nn.Dropout, self.dropout_rate, deterministic=not train)
    x = conv(self.num_filters[0], (3, 3), padding=1, name="stem")(x)
    x = residual_stages(x, self.stage_sizes, self.num_filters[1:], WideBasicBlock, "block",
                        conv=conv, norm=norm, act=self.act, dropout=dropout)
    x = self.act(norm(name="bn_final")(x))
    return classifier_head(self, x)


def _wrn(depth: int, widen_factor: int):
  if (depth - 4) % 6:
    raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
  n = (depth - 4) // 6
  k = widen_factor
  return functools.partial(
      WideResNet, stage_sizes=(n, n, n), num_filters=(16, 16 * k, 32 * k, 64 * k)
  )


wrn_16_1 = _wrn(16, 1)
wrn_16_2 = _wrn(16, 2)
wrn_40_1 = _wrn(40, 1)
wrn_40_2 = _wrn(40, 2)


# ----------------------------------------------------------------------------- VGG
VGG_CFGS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
  """RepDistiller's VGG with BatchNorm: conv blocks of 3x3 conv (with bias)-BN-ReLU.

  A 2x2 max-pool follows every block but the last two, and the second-to-last too when
  the input is 64x64 (RepDistiller's ``h == 64`` rule); the last block is followed by
  global average pooling and the Dense classifier.

  Attributes:
    cfg: output channels of each conv, grouped by block (`VGG_CFGS`).
    num_classes: classifier outputs.
    spec: `InherSpec` of the inherited network, or None for the teacher.
    dtype: computation dtype.
    act: activation.
    conv: conv class; must accept ``spec`` (`InherConv`).
  """

  cfg: Sequence[Sequence[int]]
  num_classes: int
  spec: InherSpec | None = None
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = InherConv

  @nn.compact
  def __call__(self, x, train: bool = True):
    """Logits ``(batch, num_classes)`` for NHWC images ``x``."""
    conv = model_conv(self, use_bias=True)
    norm = batch_norm(train, self.dtype)
    pooled = len(self.cfg) - (1 if x.shape[-3] == 64 else 2)
    for i, block in enumerate(self.cfg):
      for j, features in enumerate(block):
        name = "stem" if i == j == 0 else f"block{i}_conv{j}"
        x = conv(features, (3, 3), padding=1, name=name)(x)
        x = self.act(norm(name=f"block{i}_bn{j}")(x))
      if i < pooled:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return classifier_head(self, x)


vgg8 = functools.partial(VGG, cfg=VGG_CFGS[8])
vgg11 = functools.partial(VGG, cfg=VGG_CFGS[11])
vgg13 = functools.partial(VGG, cfg=VGG_CFGS[13])
vgg16 = functools.partial(VGG, cfg=VGG_CFGS[16])
vgg19 = functools.partial(VGG, cfg=VGG_CFGS[19])


MODELS = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
}
