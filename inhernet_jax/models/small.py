"""Small models for 8x8x1 digits (`inhernet_jax.data.pipeline.digits`): an MLP and a CNN.

Built from `InherDense` / `InherConv`: ``spec=None`` is the teacher, ``clone(spec=s)`` the
inherited network. Names follow the model zoo's convention: the first conv is ``stem``,
the classifier ``head``.

Example:
  ```python
  model = MODELS["cnn"](num_classes=10)
  params = model.init(key, images)["params"]
  ```
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax

from inhernet_jax.layers.linen import InherConv, InherDense
from inhernet_jax.decomposition.spec import InherSpec

ModuleDef = Any


class MLP(nn.Module):
  """Flattened input, ReLU hidden layers ``fc_0, fc_1, ...``, linear ``head``.

  Attributes:
    num_classes: classifier outputs.
    hidden: widths of the hidden layers.
    spec: None for the teacher, an `InherSpec` for the inherited network.
  """

  num_classes: int = 10
  hidden: Sequence[int] = (256, 128)
  spec: InherSpec | None = None
  dense: ModuleDef = InherDense

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """Logits ``(batch, num_classes)`` of inputs ``(batch, ...)``; ``train`` is unused."""
    del train  # No dropout or batch norm.
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      x = nn.relu(self.dense(width, spec=self.spec, name=f"fc_{i}")(x))
    return self.dense(self.num_classes, spec=self.spec, name="head")(x)


class CNN(nn.Module):
  """The quick start's digits CNN (`inhernet_jax.demo`).

  ``stem`` 3x3 conv, ``conv`` 3x3 stride-2 conv, flatten, ``fc`` Dense, ``head``; ReLU
  between layers.

  Attributes:
    num_classes: classifier outputs.
    widths: channels of ``stem`` and ``conv``, and the width of ``fc``.
    spec: None for the teacher, an `InherSpec` for the inherited network.
  """

  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  spec: InherSpec | None = None
  conv: ModuleDef = InherConv
  dense: ModuleDef = InherDense

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """Logits ``(batch, num_classes)`` of images ``(batch, 8, 8, 1)``; ``train`` is unused."""
    del train  # No dropout or batch norm.
    x = nn.relu(self.conv(self.widths[0], (3, 3), spec=self.spec, name="stem")(x))
    x = nn.relu(self.conv(self.widths[1], (3, 3), strides=2, spec=self.spec, name="conv")(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(self.dense(self.widths[2], spec=self.spec, name="fc")(x))
    return self.dense(self.num_classes, spec=self.spec, name="head")(x)


MODELS = {
    "mlp": functools.partial(MLP),
    "cnn": functools.partial(CNN),
}
