"""ImageNet ResNets in the torchvision layout (ResNet v1.5), built from InherNet layers.

Same architecture and parameter count as ``torchvision.models.resnet{18,34,50,101,152}``:
a 7x7/2 stem conv, 3x3/2 max-pool, four stages of `BasicBlock` or `Bottleneck` (stride on
the 3x3 conv, "v1.5"), a 1x1 conv + BatchNorm projection shortcut where the shape
changes, global average pooling and a Dense classifier. Padding is explicit and
symmetric as in PyTorch (Flax's ``"SAME"`` pads strided convs asymmetrically), so
converted torchvision weights compute the same function.

Every conv and the classifier are `InherConv` / `InherDense`: ``spec=None`` is the plain
teacher, ``model.clone(spec=s)`` the inherited network whose params come from
``inherit(teacher_params, s)``. BatchNorm layers are never factorised: the inherited
network uses the teacher's ``batch_stats`` as they are.

Names: the first conv is ``"stem"``, the classifier ``"head"``; blocks are
``"layer{stage}_{index}"`` (torchvision's ``layer1.0``), their convs ``conv1``..``conv3``.

Example:
  ```python
  model = resnet50(num_classes=1000)
  variables = model.init(key, jnp.zeros((1, 224, 224, 3)), train=False)
  student = model.clone(spec=InherSpec(rank=0.25, heads=3))
  ```
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from inhernet_jax.layers.linen import InherConv, InherDense
from inhernet_jax.decomposition.spec import InherSpec

ModuleDef = Any

# Kaiming normal, fan-out, as torchvision and RepDistiller initialise convs.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, dtype: Any) -> ModuleDef:
  """The BatchNorm of every model here (PyTorch's momentum 0.1 is Flax's 0.9)."""
  return functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype
  )


def model_conv(model: nn.Module, use_bias: bool) -> ModuleDef:
  """``model.conv`` with the model's dtype, init and spec (shared by the CNN families)."""
  return functools.partial(
      model.conv, use_bias=use_bias, dtype=model.dtype, kernel_init=conv_kernel_init, spec=model.spec
  )


def residual_stages(x, stage_sizes: Sequence[int], widths: Sequence[int], block: ModuleDef,
                    name: str = "layer", **kwargs):
  """Runs ``stage_sizes[i]`` blocks of ``widths[i]`` channels per stage on ``x``.

  The first block of every stage but the first has stride 2; block ``j`` of stage ``i``
  is named ``f"{name}{i + 1}_{j}"``; ``kwargs`` (conv, norm, act, ...) go to every block.
  Called from a model's compact ``__call__``, so the blocks are that model's submodules.
  """
  for i, size in enumerate(stage_sizes):
    for j in range(size):
      x = block(widths[i], strides=2 if i > 0 and j == 0 else 1, name=f"{name}{i + 1}_{j}",
                **kwargs)(x)
  return x


def classifier_head(model: nn.Module, x):
  """Global average pooling and the ``"head"`` `InherDense` of ``model.num_classes``."""
  x = jnp.mean(x, axis=(-3, -2))
  return InherDense(model.num_classes, dtype=model.dtype, spec=model.spec, name="head")(x)


class ResidualBlock(nn.Module):
  """The fields every residual block here has (`BasicBlock`, `Bottleneck`, the CIFAR
  ``WideBasicBlock``).

  Attributes:
    filters: output channels (`Bottleneck`: bottleneck channels, it outputs ``4 *``).
    conv: conv constructor (an `InherConv` partial carrying the spec).
    norm: BatchNorm constructor.
    act: activation.
    strides: stride of the strided conv and of the projection shortcut.
  """

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: int = 1

  def project_add(self, x, y):
    """``act(shortcut + y)``: the shortcut is ``x``, or where the shape changes a strided
    1x1 conv + BatchNorm of ``x`` (``proj_conv``, ``proj_bn``)."""
    residual = x
    if self.strides != 1 or x.shape[-1] != y.shape[-1]:
      residual = self.conv(y.shape[-1], (1, 1), self.strides, padding=0, name="proj_conv")(x)
      residual = self.norm(name="proj_bn")(residual)
    return self.act(residual + y)


class BasicBlock(ResidualBlock):
  """Two 3x3 convs with a residual connection (torchvision / RepDistiller ``BasicBlock``);
  fields as `ResidualBlock`'s (``strides``: of the first conv)."""

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv1")(x)
    y = self.act(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), padding=1, name="conv2")(y)
    return self.project_add(x, self.norm(name="bn2")(y))


class Bottleneck(ResidualBlock):
  """1x1 -> 3x3 (strided) -> 1x1 (x4 channels) with a residual connection (v1.5); fields
  as `ResidualBlock`'s (``filters``: bottleneck channels, the block outputs ``4 *
  filters``; ``strides``: of the 3x3 conv)."""

  @nn.compact
  def __call__(self, x):
    out = 4 * self.filters
    y = self.conv(self.filters, (1, 1), padding=0, name="conv1")(x)
    y = self.act(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv2")(y)
    y = self.act(self.norm(name="bn2")(y))
    y = self.conv(out, (1, 1), padding=0, name="conv3")(y)
    return self.project_add(x, self.norm(name="bn3")(y))


class ResNet(nn.Module):
  """torchvision-layout ResNet; stage ``i`` has ``num_filters * 2**i`` (bottleneck) channels.

  Attributes:
    stage_sizes: blocks per stage (``(2, 2, 2, 2)`` for ResNet-18).
    block_cls: `BasicBlock` or `Bottleneck`.
    num_classes: classifier outputs.
    spec: `InherSpec` of the inherited network, or None for the teacher.
    num_filters: width of the stem and of the first stage.
    dtype: computation dtype.
    act: activation.
    conv: conv class; must accept ``spec`` (`InherConv`).
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  spec: InherSpec | None = None
  num_filters: int = 64
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = InherConv

  @nn.compact
  def __call__(self, x, train: bool = True):
    """Logits ``(batch, num_classes)`` for NHWC images ``x``."""
    conv = model_conv(self, use_bias=False)
    norm = batch_norm(train, self.dtype)
    x = conv(self.num_filters, (7, 7), 2, padding=3, name="stem")(x)
    x = self.act(norm(name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    widths = [self.num_filters * 2**i for i in range(len(self.stage_sizes))]
    x = residual_stages(x, self.stage_sizes, widths, self.block_cls, conv=conv, norm=norm,
                        act=self.act)
    return classifier_head(self, x)


resnet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
resnet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
resnet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
resnet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)

MODELS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
}
