"""`inherit_model` on linen models written here (none from the zoo), one call each.

For each model and H in {1, 3}: the student's outputs equal the teacher's with every
factorised kernel replaced by its rank-r truncation, computed here in float64 from the
kernel's matrix view as written down in this file (not read back from the package);
`student.init` gives the tree, shapes and dtypes of the inherited params; a jitted optax
step lowers the loss; an orbax checkpoint round-trips. Shapes are tiny and shared.
"""


import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

import inhernet_jax as ij
from matrix_views import truncated, view

KEY = jax.random.key(0)
RANK = 4
W = 32  # Every hidden width.


# ------------------------------------------------------------------------- models
class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = nn.relu(nn.Dense(W)(x))
    return nn.Dense(10)(x)


class BNCNN(nn.Module):
  """Automatic names (Conv_0, BatchNorm_0, Dense_0), BatchNorm, a strided conv."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(W, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.Conv(W, (3, 3), strides=2, use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return nn.Dense(10)(x.mean((1, 2)))


class GroupedCNN(nn.Module):
  """Grouped, depthwise and dilated convs."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(W, (3, 3))(x))
    x = nn.relu(nn.Conv(W, (3, 3), feature_group_count=4)(x))
    x = nn.relu(nn.Conv(W, (3, 3), feature_group_count=W, use_bias=False)(x))  # Depthwise.
    x = nn.relu(nn.Conv(W, (3, 3), kernel_dilation=2, padding="SAME")(x))
    return nn.Dense(10)(x.mean((1, 2)))


class Block(nn.Module):
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=4, use_bias=self.use_bias)(h, h)
    x = x + nn.Dropout(0.1, deterministic=not train)(h)
    h = nn.Einsum((W, 2, W), "btd,dgf->btgf", use_bias=self.use_bias)(nn.LayerNorm()(x))
    h = nn.gelu(h).reshape(*h.shape[:-2], 2 * W)
    return x + nn.Dense(W, use_bias=self.use_bias)(h)


class Transformer(nn.Module):
  """nn.MultiHeadDotProductAttention with and without biases, an nn.Einsum MLP, a
  permuted nn.Einsum embedding."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Einsum((W, W), "btd,ed->bte")(x)  # Kernel (out, in): permuted view.
    x = Block(use_bias=True)(x, train)
    x = Block(use_bias=False)(x, train)
    return nn.Dense(10)(x.mean(1))


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    return Block(use_bias=False, name="block")(x, train), None


class ScanTransformer(nn.Module):
  """Bias-free nn.scan-stacked blocks (remat inside the scan)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(W)(x)
    stack = nn.scan(nn.remat(ScanBlock, static_argnums=(2,)), variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True}, length=2,
                    in_axes=nn.broadcast)
    x, _ = stack(name="blocks")(x, train)
    return nn.Dense(10)(x.mean(1))


# How each kernel is one matrix: (stack axes, input axes of the unstacked kernel);
# the first matching pattern wins, default (0, all axes but the last).
ATTN = r".*(query|key|value)/kernel"
CASES = {
    "mlp": (MLP(), (4, W), {}, ()),
    "bn_cnn": (BNCNN(), (2, 8, 8, 3), {"train": False}, ()),
    "grouped_cnn": (GroupedCNN(), (2, 8, 8, 8), {}, ()),
    "transformer": (Transformer(), (2, 6, W), {"train": False}, (
        (ATTN, (0, (0,))), (r".*out/kernel", (0, (0, 1))), (r"Einsum_0/kernel", (0, (1,))),
        (r".*Einsum_0/kernel", (0, (0,))))),
    "scan_transformer": (ScanTransformer(), (2, 6, W), {"train": False}, (
        (r"blocks/" + ATTN, (1, (1,))), (r"blocks/.*out/kernel", (1, (1, 2))),
        (r"blocks/.*Einsum_0/kernel", (1, (1,))), (r"blocks/.*", (1, None)))),
}



def _reference(params, new_params, views):
  """The teacher's params with every factorised kernel truncated to its rank."""
  flat = traverse_util.flatten_dict(params)
  new = traverse_util.flatten_dict(new_params)
  out = dict(flat)
  factorised = 0
  for keys, kernel in flat.items():
    if keys[-1] != "kernel" or (*keys[:-1], "down", "kernel") not in new:
      continue
    rank = new[(*keys[:-1], "down", "kernel")].shape[-1]
    stack, ins = view("/".join(keys), kernel.ndim, views)
    out[keys] = truncated(kernel, stack, ins, rank)
    factorised += 1
  return traverse_util.unflatten_dict(out), factorised


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  model, shape, kwargs, views = CASES[request.param]
  x = jax.random.normal(jax.random.key(1), shape)
  variables = model.init({"params": KEY, "dropout": KEY}, x, **kwargs)
  return request.param, model, x, kwargs, views, variables


@pytest.mark.parametrize("heads", [1, 3])
def test_student_is_the_truncated_teacher_and_init_matches(case, heads):
  name, model, x, kwargs, views, variables = case
  student, new_vars, rows = ij.inherit_model(model, variables, ij.InherSpec(rank=RANK, heads=heads),
                                             x, apply_kwargs=kwargs, return_report=True)
  ref_params, factorised = _reference(variables["params"], new_vars["params"], views)
  assert factorised == sum(r["action"] == "factorize" for r in rows) >= 2, rows
  want = model.apply({**variables, "params": ref_params}, x, **kwargs)
  got = student.apply(new_vars, x, **kwargs)
  assert _rel(got, want) <= 1e-5
  # The user's names: every non-kernel leaf (norms, biases of kept layers, batch_stats)
  # is where it was, and `init` builds exactly this tree.
  init = student.init({"params": KEY, "dropout": KEY}, x, **kwargs)
  spec = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)  # noqa: E731
  assert spec(init) == spec(jax.tree.map(jnp.asarray, dict(new_vars)))
  # The output layer is kept, with its reason.
  head = [r for r in rows if r["path"].endswith("Dense_" + str(_last_dense(variables)) + "/kernel")]
  assert head and head[-1]["action"] == "keep" and "output layer" in head[-1]["reason"]


def _last_dense(variables):
  return max(int(k.split("_")[1]) for k in variables["params"] if k.startswith("Dense_"))


def test_jitted_train_step_lowers_the_loss_and_checkpoint_round_trips(case, tmp_path):
  name, model, x, kwargs, views, variables = case
  student, new_vars = ij.inherit_model(model, variables, ij.InherSpec(rank=RANK, heads=3), x,
                                       apply_kwargs=kwargs)
  labels = jnp.arange(x.shape[0]) % 10
  train_kwargs = {k: True for k in kwargs}  # train=True: BatchNorm updates, dropout on.
  mutable = [c for c in new_vars if c != "params"]
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, rest, opt_state, key):
    def loss_fn(p):
      logits, state = student.apply({"params": p, **rest}, x, rngs={"dropout": key},
                                    mutable=mutable, **train_kwargs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), {**rest, **state}, opt_state, loss

  params, rest = new_vars["params"], {k: v for k, v in new_vars.items() if k != "params"}
  opt_state = tx.init(params)
  losses = []
  for i in range(4):
    params, rest, opt_state, loss = step(params, rest, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses
  # Orbax: save the trained student, restore into its init's structure.
  trained = {"params": params, **rest}
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", trained)
  with ocp.StandardCheckpointer() as ckpt:
    target = jax.eval_shape(lambda: student.init({"params": KEY, "dropout": KEY}, x, **kwargs))
    restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), dict(target)))
  chex.assert_trees_all_equal(restored, jax.tree.map(np.asarray, trained))
  chex.assert_trees_all_close(student.apply(restored, x, **kwargs),
                              student.apply(trained, x, **kwargs))


def test_a_zoo_teacher_read_as_a_user_model_is_the_zoo_inherited_network():
  """The same network both ways: `inherit_model` on the zoo teacher (its InherConv /
  InherDense without a spec are plain convs and denses) and `teacher.clone(spec=...)`."""
  from inhernet_jax import models

  teacher = models.create("cnn", num_classes=10, widths=(8, 16, 32))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  variables = teacher.init(KEY, x, train=False)
  spec = ij.InherSpec(rank=4, heads=3, rules=models.preset("default", "cnn"))
  student, new_vars = ij.inherit_model(teacher, variables, spec, x, apply_kwargs={"train": False})
  want = ij.inherit(variables["params"], spec)
  chex.assert_trees_all_close(dict(new_vars["params"]), want, rtol=1e-6, atol=1e-6)
  zoo = teacher.clone(spec=spec)
  chex.assert_trees_all_close(student.apply(new_vars, x, train=False),
                              zoo.apply({**variables, "params": want}, x, train=False),
                              rtol=1e-5, atol=1e-5)


def test_data_aware_inherit_model_lowers_the_output_error():
  """Grams from `calibration.grams.input_grams` of the user's own model, by its paths."""
  from inhernet_jax.calibration.grams import input_grams

  model, shape, kwargs, _ = CASES["bn_cnn"]
  x = jax.random.normal(jax.random.key(1), (16, *shape[1:]))
  variables = model.init(KEY, x, **kwargs)
  grams = input_grams(model, variables, [x], apply_kwargs=kwargs)
  spec = ij.InherSpec(rank=RANK, heads=3, data_aware=True)
  _, _, aware = ij.inherit_model(model, variables, spec, x, apply_kwargs=kwargs,
                                 calibration=grams, return_report=True)
  _, _, plain = ij.inherit_model(model, variables, spec.replace(data_aware=False), x,
                                 apply_kwargs=kwargs, calibration=grams, return_report=True)
  plain_error = {r["path"]: r["output_rel_error"] for r in plain}
  rows = [r for r in aware if r["data_aware"]]
  assert [r["path"] for r in rows] == ["Conv_0/kernel", "Conv_1/kernel"], aware
  for r in rows:
    assert r["output_rel_error"] <= plain_error[r["path"]] + 1e-6, r["path"]


# ------------------------------------------------- no example input: read without a call
COMPACT_EINSUM = r".*Einsum_\d+/kernel"  # A compact nn.Einsum's equation needs a call.


def test_no_input_call_is_the_traced_call(case):
  """``inherit_model(model, variables, spec)``: the same params, layers and outputs as
  with an example input; compact einsums (equation unknown without a call) are an error
  naming the kernel, unless a rule keeps them."""
  name, model, x, kwargs, views, variables = case
  spec = ij.InherSpec(rank=RANK, heads=3)
  if "transformer" in name:
    with pytest.raises(ValueError, match=r"Einsum_0/kernel .*pass an example input"):
      ij.inherit_model(model, variables, spec)
    spec = spec.replace(rules=((COMPACT_EINSUM, "skip"),))
  traced, traced_vars = ij.inherit_model(model, variables, spec, x, apply_kwargs=kwargs)
  student, new_vars = ij.inherit_model(model, variables, spec)
  assert student.planned == traced.planned and len(student.planned) >= 2
  chex.assert_trees_all_equal(new_vars, traced_vars)
  chex.assert_trees_all_equal(student.apply(new_vars, x, **kwargs),
                              traced.apply(traced_vars, x, **kwargs))


class SetupModel(nn.Module):
  """Layers from ``setup``, user names: the einsum's equation is a field, read by binding."""

  def setup(self):
    self.embed = nn.Einsum((W, W), "btd,ed->bte", use_bias=False)  # Kernel (out, in).
    self.proj = nn.DenseGeneral((2, W // 2), use_bias=False)
    self.head = nn.Dense(10)

  def __call__(self, x):
    h = self.proj(nn.relu(self.embed(x)))
    return self.head(h.reshape(*h.shape[:-2], W).mean(1))


def test_no_input_call_reads_setup_layers_and_checks_each_view_when_traced():
  x = jax.random.normal(jax.random.key(1), (2, 6, W))
  model = SetupModel()
  variables = model.init(KEY, x)
  spec = ij.InherSpec(rank=RANK, heads=3)
  traced, traced_vars = ij.inherit_model(model, variables, spec, x)
  student, new_vars = ij.inherit_model(model, variables, spec)
  assert [p.path for p in student.planned] == [("embed",), ("proj",)]
  assert student.planned == traced.planned
  chex.assert_trees_all_equal(new_vars, traced_vars)
  # The same einsum written compactly under a user name is read as a plain (in, out)
  # matrix: the first trace finds the permuted kernel and refuses it.

  class Compact(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Einsum((W, W), "btd,ed->bte", use_bias=False, name="embed")(x)
      return nn.Dense(10)(nn.Dense(W)(x).mean(1))

  model = Compact()
  variables = model.init(KEY, x)
  student, new_vars = ij.inherit_model(model, variables, spec)
  with pytest.raises(ValueError, match=r"embed/kernel was inherited as the \(32,\) -> \(32,\) matrix \(perm None\), but the model calls it as a einsum \(32,\) -> \(32,\) \(perm \(1, 0\)\)"):
    student.apply(new_vars, x)


class EncDec(nn.Module):
  """A model with a method besides ``__call__``."""

  def setup(self):
    self.enc = nn.Dense(W)
    self.mid = nn.Dense(W)
    self.head = nn.Dense(10)

  def encode(self, x):
    return self.mid(nn.relu(self.enc(x)))

  def __call__(self, x):
    return self.head(nn.relu(self.encode(x)))


def test_other_methods_of_the_user_model_run_with_the_inherited_layers():
  model, x = EncDec(), jax.random.normal(jax.random.key(1), (4, W))
  variables = model.init(KEY, x)
  student, new_vars = ij.inherit_model(model, variables, ij.InherSpec(rank=RANK, heads=1))
  ref_params, factorised = _reference(variables["params"], new_vars["params"], ())
  assert factorised == 2  # enc and mid; the head is the output layer, kept.
  want = model.apply({"params": ref_params}, x, method="encode")
  for method in ("encode", model.encode, EncDec.encode):
    assert _rel(student.apply(new_vars, x, method=method), want) <= 1e-5
  spec = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)  # noqa: E731
  assert spec(student.init(KEY, x, method="encode")["params"]) == spec(
      {k: new_vars["params"][k] for k in ("enc", "mid")})
  with pytest.raises(AttributeError, match="EncDec has no method 'decode'"):
    student.apply(new_vars, x, method="decode")
