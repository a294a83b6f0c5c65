"""EfficientNet-Lite (Lite0) in the layout of EfficientNet-PyTorch / efficientnet-lite-pytorch.

Same architecture as ``efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")``
(Google's TF EfficientNet-Lite, ported): a 3x3/2 stem conv, 16 MBConv blocks (1x1 expand,
k x k *depthwise* conv, 1x1 project, a residual where shapes agree; no squeeze-excite),
a 1x1 conv to 1280 channels, global average pooling, dropout and a Dense classifier.
BatchNorm everywhere (epsilon 1e-3, PyTorch momentum 0.01), ReLU6 (the Lite variants'
activation, for quantisation). Padding is TensorFlow's ``"SAME"`` (the reference's
``Conv2dStaticSamePadding``: the extra pixel of a strided conv goes after), so converted
weights (`inhernet_jax.interop.efficientnet`) compute the same function.

Every conv and the classifier are `InherConv` / `InherDense`: ``spec=None`` is the plain
teacher, ``model.clone(spec=s)`` the inherited network. The depthwise convs are grouped
(``feature_group_count`` = channels): their kernels ``(k, k, 1, C)`` are kept as the
teacher's (see `DEPTHWISE_RULE` and `layers.InherConv`): per group the kernel is a
``k*k x 1`` matrix, rank 1, so there is nothing to factorise per group, and they hold
about 1% of Lite0's parameters. `models.preset` adds the rule for this family.

Names: ``stem`` / ``bn_stem``; blocks ``block_{i}`` (PyTorch ``_blocks.i``) with
``expand`` / ``bn0``, ``depthwise`` / ``bn1``, ``project`` / ``bn2``; ``top_conv`` /
``bn_top`` (PyTorch ``_conv_head`` / ``_bn1``); classifier ``head`` (``_fc``).

Example:
  ```python
  model = efficientnet_lite0(num_classes=1000)
  variables = model.init(key, jnp.zeros((1, 224, 224, 3)), train=False)
  spec = InherSpec(rank=0.25, rules=models.preset("default", "efficientnet_lite0"))
  student = model.clone(spec=spec)
  ```
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from inhernet_jax.layers.linen import InherConv, InherDense
from inhernet_jax.models.imagenet import conv_kernel_init
from inhernet_jax.decomposition.spec import InherSpec

ModuleDef = Any

# (repeats, kernel, stride, expand ratio, input channels, output channels) per stage:
# efficientnet_lite_builder.py's 'r1_k3_s11_e1_i32_o16', ... at width = depth = 1.0.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

DEPTHWISE_RULE = (r"(.*/)?depthwise/kernel", "skip")
"""The rule that keeps every depthwise kernel: `models.preset` puts it first for this
family (a depthwise conv cannot be factorised: `InherConv` refuses grouped convs)."""

# ImageNet normalisation of the reference's README (torchvision's), on RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def batch_norm(train: bool, dtype: Any) -> ModuleDef:
  """TF EfficientNet's BatchNorm: epsilon 1e-3, momentum 0.99 (PyTorch's 0.01)."""
  return functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.99, epsilon=1e-3, dtype=dtype
  )


class MBConv(nn.Module):
  """Mobile inverted bottleneck without squeeze-excite (EfficientNet-Lite's block).

  Attributes:
    features: output channels.
    kernel: depthwise kernel size.
    strides: depthwise stride.
    expand: expansion ratio (1: no expand conv).
    conv: conv constructor (an `InherConv` partial carrying the spec).
    norm: BatchNorm constructor.
    act: activation.
  """

  features: int
  kernel: int
  strides: int
  expand: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = jax.nn.relu6

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1] * self.expand
    y = x
    if self.expand != 1:
      y = self.act(self.norm(name="bn0")(self.conv(channels, (1, 1), name="expand")(y)))
    y = self.conv(channels, (self.kernel, self.kernel), self.strides,
                  feature_group_count=channels, name="depthwise")(y)
    y = self.act(self.norm(name="bn1")(y))
    y = self.norm(name="bn2")(self.conv(self.features, (1, 1), name="project")(y))
    if self.strides == 1 and x.shape[-1] == self.features:
      y = y + x  # Stochastic depth (drop-connect) of the reference's training is not applied.
    return y


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite classifier on NHWC images normalised by `IMAGENET_MEAN` / `_STD`.

  Attributes:
    num_classes: classifier outputs.
    spec: `InherSpec` of the inherited network, or None for the teacher.
    stages: ``(repeats, kernel, stride, expand, in, out)`` per stage (`LITE0_STAGES`).
    stem_features: stem channels (Lite fixes them at 32).
    top_features: channels of the last 1x1 conv (Lite fixes them at 1280).
    dropout_rate: dropout before the classifier in training (needs a ``"dropout"`` rng).
    dtype: computation dtype.
  """

  num_classes: int = 1000
  spec: InherSpec | None = None
  stages: Sequence[Sequence[int]] = LITE0_STAGES
  stem_features: int = 32
  top_features: int = 1280
  dropout_rate: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    """Logits ``(batch, num_classes)``."""
    conv = functools.partial(InherConv, use_bias=False, padding="SAME", dtype=self.dtype,
                             kernel_init=conv_kernel_init, spec=self.spec)
    norm = batch_norm(train, self.dtype)
    act = jax.nn.relu6
    x = act(norm(name="bn_stem")(conv(self.stem_features, (3, 3), 2, name="stem")(x)))
    index = 0
    for repeats, kernel, stride, expand, _, features in self.stages:
      for j in range(repeats):
        x = MBConv(features, kernel, stride if j == 0 else 1, expand, conv=conv, norm=norm,
                   act=act, name=f"block_{index}")(x)
        index += 1
    x = act(norm(name="bn_top")(conv(self.top_features, (1, 1), name="top_conv")(x)))
    x = jnp.mean(x, axis=(-3, -2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return InherDense(self.num_classes, dtype=self.dtype, spec=self.spec, name="head")(x)


efficientnet_lite0 = functools.partial(EfficientNetLite, stages=LITE0_STAGES)

MODELS = {"efficientnet_lite0": efficientnet_lite0}
