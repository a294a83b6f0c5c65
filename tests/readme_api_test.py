"""The README's "API in ten lines" runs as written (the user-model path first), on tiny
stand-ins for the names it assumes: a user's linen model, an NNX model, a zoo teacher."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from inhernet_jax import models
from inhernet_jax.layers.nnx import InherLayer

ROOT = pathlib.Path(__file__).resolve().parents[1]


class MyModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(256)(nn.relu(nn.Dense(256)(x)))))


class MyNNX(nnx.Module):
  def __init__(self, rngs):
    self.fc1, self.fc2 = nnx.Linear(256, 256, rngs=rngs), nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def _block() -> str:
  text = (ROOT / "README.md").read_text()
  section = text.split("## The API in ten lines", 1)[1]
  return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_api_in_ten_lines_runs_and_starts_with_the_user_model():
  code = _block()
  first = next(line for line in code.splitlines() if "=" in line and not line.startswith("#"))
  assert "inherit_model(model, variables" in first, first
  x = jnp.ones((2, 256))
  model = MyModel()
  teacher = models.create("cnn", num_classes=10, widths=(32, 64, 128))
  namespace = {
      "model": model, "x": x, "variables": model.init(jax.random.key(0), x),
      "nnx_model": MyNNX(nnx.Rngs(0)), "teacher": teacher,
      "teacher_params": teacher.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)),
                                     train=False)["params"]}
  exec(compile(code, "README.md (API in ten lines)", "exec"), namespace)  # noqa: S102
  assert namespace["logits"].shape == (2, 10)
  assert isinstance(namespace["nnx_model"].fc1, InherLayer)  # Inherited in place.
  assert "down" in namespace["new_variables"]["params"]["Dense_1"]  # Dense_2: the output.
