"""`inhernet_jax.nnx.inherit` on NNX models written here (none from the zoo), one call each.

For each model and H in {1, 3}: the inherited model equals the teacher with every
factorised kernel replaced by its rank-r truncation (float64 SVD of the matrix view
written down here); an `nnx.jit` step with `nnx.Optimizer` lowers the loss; the state
round-trips through `nnx.split` / `nnx.merge` and an orbax checkpoint.
"""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import inhernet_jax as ij
from inhernet_jax.layers.nnx import InherLayer
from matrix_views import truncated, view

RANK = 4
W = 32
L = 2


class CNN(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, W, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(W, rngs=rngs)
    self.conv2 = nnx.Conv(W, W, (3, 3), strides=2, feature_group_count=4, rngs=rngs)
    self.bn2 = nnx.BatchNorm(W, rngs=rngs)
    self.head = nnx.Linear(W, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(x.mean((1, 2)))


class Transformer(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(W, W, rngs=rngs)
    self.norm = nnx.LayerNorm(W, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(4, W, decode=False, use_bias=False, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.fc1 = nnx.Einsum("btd,dgf->btgf", (W, 2, W), (2, W), rngs=rngs)
    self.fc2 = nnx.Linear(2 * W, W, rngs=rngs)
    self.head = nnx.Linear(W, 10, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    h = self.norm(x)
    x = x + self.drop(self.attn(h, h))
    h = nnx.gelu(self.fc1(x))
    x = x + self.fc2(h.reshape(*h.shape[:-2], 2 * W))
    return self.head(x.mean(1))


class Block(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(W, 2 * W, use_bias=False, rngs=rngs)
    self.fc2 = nnx.Linear(2 * W, W, use_bias=False, rngs=rngs)
    self.norm = nnx.LayerNorm(W, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(nnx.gelu(self.fc1(self.norm(x))))


class ScanStack(nnx.Module):
  """Bias-free blocks created by nnx.vmap and run by nnx.scan."""

  def __init__(self, rngs):
    self.embed = nnx.Linear(W, W, rngs=rngs)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(W, 10, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(block, x):
      return block(x)

    return self.head(body(self.blocks, self.embed(x)).mean(1))


# (pattern, (stack axes, input axes of the unstacked kernel)); default (0, all but last).
CASES = {
    "cnn": (CNN, (2, 8, 8, 3), ()),
    "transformer": (Transformer, (2, 6, W), (
        (r"attn/(query|key|value)/kernel", (0, (0,))), (r"attn/out/kernel", (0, (0, 1))),
        (r"fc1/kernel", (0, (0,))))),
    "scan": (ScanStack, (2, 6, W), ((r"blocks/.*", (1, None)),)),
}



def _get(model, path):
  for k in path:
    model = getattr(model, k)
  return model


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_inherited_model_is_the_truncated_teacher(name, heads):
  cls, shape, views = CASES[name]
  model = cls(nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(1), shape)
  reference = nnx.clone(model)
  same, rows = ij.nnx.inherit(model, ij.InherSpec(rank=RANK, heads=heads), return_report=True)
  assert same is model
  factorised = [r for r in rows if r["action"] == "factorize"]
  assert len(factorised) >= 2, rows
  for r in factorised:
    path = tuple(r["path"].split("/")[:-1])
    layer = _get(model, path)
    assert isinstance(layer, InherLayer) and (layer.rank, layer.heads) == (RANK, heads)
    teacher = _get(reference, path)
    stack, ins = view(r["path"], teacher.kernel.ndim, views)
    teacher.kernel.set_value(jnp.asarray(truncated(teacher.kernel[...], stack, ins, RANK)))
  head = [r for r in rows if r["path"] == "head/kernel"]
  assert head[0]["action"] == "keep" and "output layer" in head[0]["reason"]
  assert isinstance(model.head, nnx.Linear)
  assert _rel(model(x), reference(x)) <= 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_step_split_merge_and_checkpoint(name, tmp_path):
  cls, shape, _ = CASES[name]
  model = cls(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), shape)
  labels = jnp.arange(shape[0]) % 10
  ij.nnx.inherit(model, ij.InherSpec(rank=RANK, heads=3))
  model.train()
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(4)]
  assert losses[-1] < losses[0], losses
  model.eval()
  want = model(x)
  graphdef, state = nnx.split(model)
  chex.assert_trees_all_close(nnx.merge(graphdef, state)(x), want)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", nnx.state(model))
  # Restore into a fresh inherited model of the same structure (abstract: no SVD values).
  fresh = cls(nnx.Rngs(1))
  ij.nnx.inherit(fresh, ij.InherSpec(rank=RANK, heads=3))
  fresh.eval()
  graphdef, abstract = nnx.split(fresh)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract))
  nnx.update(fresh, restored)
  chex.assert_trees_all_close(fresh(x), want, rtol=1e-6, atol=1e-6)


def test_data_aware_inheritance_lowers_the_output_error():
  """`ij.nnx.input_grams` then a data-aware spec: each data-aware kernel's output error on
  the calibration inputs is at most the plain truncation's (the whitened SVD is optimal
  for it); the einsum (no Gram) is named when asked to be data-aware."""
  model = Transformer(nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(1), (32, 6, W))
  grams = ij.nnx.input_grams(model, [x[:16], x[16:]])
  assert isinstance(model.embed, nnx.Linear)  # The recorders are gone.
  assert grams["attn/out/kernel"]["gram"].shape == (W, W) and grams["fc2/kernel"]["count"] == 32 * 6
  spec = ij.InherSpec(rank=RANK, heads=3, data_aware=True,
                      rules=((r"fc1/kernel", {"data_aware": False}),))
  plain = nnx.clone(model)
  _, aware_rows = ij.nnx.inherit(model, spec, calibration=grams, return_report=True)
  _, plain_rows = ij.nnx.inherit(plain, spec.replace(data_aware=False), calibration=grams,
                                 return_report=True)
  plain_error = {r["path"]: r["output_rel_error"] for r in plain_rows}
  aware = [r for r in aware_rows if r["data_aware"]]
  assert len(aware) == 6, aware_rows
  for r in aware:
    assert r["output_rel_error"] <= plain_error[r["path"]] + 1e-6, r["path"]
  teacher = Transformer(nnx.Rngs(0))
  with pytest.raises(ValueError, match="fc1/kernel: data-aware inheritance needs"):
    ij.nnx.inherit(teacher, ij.InherSpec(rank=RANK, data_aware=True), calibration=grams)
  assert isinstance(teacher.embed, nnx.Linear)  # Nothing modified on an error.
  # An inherited model inherited again: its InherLayers are left as they are.
  _, rows = ij.nnx.inherit(plain, ij.InherSpec(rank=2), return_report=True)
  assert [r["path"] for r in rows if r["action"] == "factorize"] == []


def test_scan_stacked_layers_get_stacked_grams_and_gramless_layers_are_refused_by_name():
  """nnx.vmap-created layers run by nnx.scan: each slice's Gram is its own input's
  ``X^T X`` (checked against the slices run one by one); a grouped conv (no Gram) asked
  to be data-aware is refused, naming it; data-aware beats plain on the stack."""
  model = ScanStack(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 6, W))
  grams = ij.nnx.input_grams(model, [x[:4], x[4:]])
  assert isinstance(model.blocks.fc1, nnx.Linear)  # The recorders are gone.
  graphdef, state = nnx.split(model.blocks)
  h = model.embed(x)
  for i in range(L):
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
    rows = block.norm(h).reshape(-1, W)
    np.testing.assert_allclose(grams["blocks/fc1/kernel"]["gram"][i], rows.T @ rows,
                               rtol=1e-4, atol=1e-3)
    h = block(h)
  np.testing.assert_array_equal(grams["blocks/fc2/kernel"]["count"], [8 * 6] * L)
  spec = ij.InherSpec(rank=RANK, heads=3, data_aware=True)
  plain = nnx.clone(model)
  _, aware = ij.nnx.inherit(model, spec, calibration=grams, return_report=True)
  _, rows = ij.nnx.inherit(plain, spec.replace(data_aware=False), calibration=grams,
                           return_report=True)
  plain_error = {r["path"]: r["output_rel_error"] for r in rows}
  stacked = [r for r in aware if r["path"].startswith("blocks/") and r["data_aware"]]
  assert len(stacked) == 2, aware
  for r in stacked:
    assert r["output_rel_error"] <= plain_error[r["path"]] + 1e-6, r["path"]
  cnn = CNN(nnx.Rngs(0))
  grams = ij.nnx.input_grams(cnn, [jax.random.normal(jax.random.key(1), (2, 8, 8, 3))])
  assert "conv2/kernel" not in grams
  with pytest.raises(ValueError, match=r"conv2/kernel: .*none for a grouped nnx.Conv"):
    ij.nnx.inherit(cnn, spec, calibration=grams)
  assert isinstance(cnn.conv2, nnx.Conv)  # Nothing modified on an error.
