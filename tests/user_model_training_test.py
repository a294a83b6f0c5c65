"""A user's own linen model (not from the zoo), inherited by `inherit_model`, through the
project's machinery: the trainer (a few steps, a checkpoint it resumes from), the
export and its reload, and the sharding rules placing the inherited params."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AbstractMesh

import inhernet_jax as ij
from inhernet_jax.common import utils
from inhernet_jax.data import pipeline as data
from inhernet_jax.interop import export
from inhernet_jax.parallel import sharding
from inhernet_jax.training import checkpoint, trainer

W = 16


class DigitsNet(nn.Module):
  """Automatic names, BatchNorm, a multi-head attention over the 8 rows, dropout."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(W, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.Dense(W)(x.reshape(x.shape[0], 8, 8 * W))  # 8 tokens of 128.
    h = nn.MultiHeadDotProductAttention(num_heads=2)(x, x)
    x = x + nn.Dropout(0.1, deterministic=not train)(h)
    return nn.Dense(10)(x.mean(1))


@pytest.fixture(scope="module")
def digits():
  return data.get({"name": "digits"}, batch_size=256, seed=0, eval_batch_size=512)


@pytest.fixture(scope="module")
def inherited():
  model = DigitsNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  spec = ij.InherSpec(rank=4, heads=2)
  student, new_vars = ij.inherit_model(model, variables, spec)
  assert {p.path for p in student.planned} >= {("Dense_0",), (
      "MultiHeadDotProductAttention_0", "query")}, student.planned
  return model, student, dict(new_vars), spec


def _config():
  return ml_collections.ConfigDict({
      "optimizer": {"name": "adam", "learning_rate": 3e-3, "schedule": "constant"},
      "compute_dtype": "float32", "checkpoint_every_steps": 5, "keep_checkpoints": 2,
      "async_checkpoints": False, "log_every_steps": 0, "progress": False})


def test_the_trainer_trains_resumes_and_the_export_reloads(inherited, digits, tmp_path):
  model, student, new_vars, spec = inherited
  mesh = sharding.make_mesh()
  run = trainer.train_and_evaluate(student, new_vars, digits, _config(), tmp_path / "run",
                                   seed=0, epochs=1, mesh=mesh, sharding_rules="tensor_parallel")
  losses = run.history["test_loss"]
  assert losses[-1] < losses[0], losses  # Epoch 0: before training.
  assert run.gates is not None  # The inherited layers' gate statistics were collected.
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       new_vars["batch_stats"], run.state.batch_stats)
  assert max(jax.tree.leaves(moved)) > 1e-4
  # The run's checkpoint restores into the student's own `init` tree.
  trained = {"params": run.state.params, "batch_stats": run.state.batch_stats}
  x = next(iter(digits.eval_batches()))["input"][:16]
  abstract = jax.eval_shape(lambda: student.init(jax.random.key(1), x))
  restored = checkpoint.load_variables(tmp_path / "run", abstract)
  jax.tree.map(np.testing.assert_array_equal, restored, trained)
  # Export (safetensors + spec.json naming the inherited layers) and rebuild the student.
  from launch.user_model import student_from_export

  planned = [[list(p.path), p.rank, p.heads, p.view] for p in student.planned]
  export.save(tmp_path / "export", trained, spec, metadata={"planned": planned})
  weights, saved_spec = export.load(tmp_path / "export")
  assert saved_spec == spec
  rebuilt = student_from_export(model, tmp_path / "export")
  assert rebuilt.planned == student.planned
  assert [p.view for p in rebuilt.planned] == [p.view for p in student.planned]
  np.testing.assert_array_equal(rebuilt.apply(weights, x), student.apply(trained, x))


def test_sharding_rules_place_the_inherited_params(inherited):
  """On a (data 2, fsdp 2, model 2) mesh: tensor-parallel rules split the attention's
  inherited up-projections' outputs over ``model``, keep gates replicated, and every
  param gets a placement its shape allows (an unfit rule would raise, naming it)."""
  _, _, new_vars, _ = inherited
  mesh = AbstractMesh((2, 2, 2), sharding.AXES)
  rules = sharding.resolve_rules("tensor_parallel")
  specs = {path: sharding.partition_spec(mesh, path, np.shape(leaf), rules)
           for path, leaf in utils.flatten_with_names(new_vars["params"])}
  attn = "MultiHeadDotProductAttention_0"
  assert specs[f"{attn}/query/up/kernel"] == jax.sharding.PartitionSpec(None, None, "model")
  assert specs[f"{attn}/query/down/kernel"] == jax.sharding.PartitionSpec("fsdp", None)
  assert specs[f"{attn}/query/gate/kernel"] == jax.sharding.PartitionSpec()
  assert specs["Dense_0/up/kernel"] == jax.sharding.PartitionSpec(None, None, "fsdp")
