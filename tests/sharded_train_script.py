"""Runs the trainer on several meshes / processes; used by sharded_train_test.py.

Not a test module: each mode runs in its own process, because the device count
(``--xla_force_host_platform_device_count``) and `jax.distributed` must be set before
JAX starts.

  python tests/sharded_train_script.py meshes OUT.json
  python tests/sharded_train_script.py worker OUT.json WORKDIR COORDINATOR NUM_PROCESSES ID
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inhernet_jax import models
from inhernet_jax.data import pipeline as data
from inhernet_jax.parallel import distributed
from inhernet_jax.parallel import sharding
from inhernet_jax.training import trainer as train  # noqa: E402
from inhernet_jax.decomposition.transform import inherit  # noqa: E402
from inhernet_jax.decomposition.spec import InherSpec  # noqa: E402

STEPS = 3


def config():
  return ml_collections.ConfigDict({
      # SGD: Adam's update m / sqrt(v) turns the rounding noise of near-zero gradients
      # into +-lr steps, so no two summation orders agree on its parameters to 1e-5. And
      # a small lr: at 0.1 (0.05 on some meshes) this random-init ResNet is so unstable
      # that a 6e-8 difference after step 1 (summation order) grows to 2e-4 by step 3,
      # between any two device counts; in float64 they agree to 2e-7. At 0.02 it was
      # still on the edge: a 2e-6 change of the inherited start (the SVD's rounding)
      # took the six-step resume check from 1.2e-7 to 2e-4 (0.01: 6e-5); at 0.005 every
      # mesh and the resume agree to 2.4e-7 (the parameters still move by up to 0.36).
      "optimizer": {"name": "sgd", "learning_rate": 0.005, "momentum": 0.9,
                    "schedule": "constant"},
      "compute_dtype": "float32", "checkpoint_every_steps": 0, "keep_checkpoints": 2,
      "async_checkpoints": False, "log_every_steps": 0, "progress": False,
  })


def digits_pipeline(mesh, batch=472):
  # 1437 digits // 472 = 3 steps per epoch: one epoch is the three steps.
  slot, slots = sharding.process_batch_slot(mesh, batch)
  return data.get({"name": "digits"}, batch_size=batch, seed=0, eval_batch_size=368,
                  process_index=slot, process_count=slots)


def chars_pipeline(mesh, batch=16):
  slot, slots = sharding.process_batch_slot(mesh, batch)
  return data.get({"name": "chars", "seq_len": 16, "train_windows": STEPS * batch,
                   "eval_windows": 16}, batch_size=batch, seed=0, process_index=slot,
                  process_count=slots)


def resnet():
  """resnet8 (BatchNorm) inherited at rank 8 with 2 heads, from a random teacher."""
  teacher = models.create("resnet8", num_classes=10)
  t_vars = teacher.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  spec = InherSpec(rank=8, heads=2, rules=models.preset("default", "resnet8"))
  variables = {"params": inherit(t_vars["params"], spec), "batch_stats": t_vars["batch_stats"]}
  return teacher.clone(spec=spec), variables


def gpt():
  """A 2-layer scan GPT inherited at rank 8 with 2 heads (tensor-parallel rules)."""
  teacher = models.create("gpt2_small", num_classes=data.CHARS_VOCAB, width=32, depth=2,
                          num_heads=4, mlp_dim=64, max_len=16, scan=True)
  t_vars = teacher.init(jax.random.key(1), jnp.zeros((1, 16), jnp.int32), train=False)
  spec = InherSpec(rank=8, heads=2, rules=models.preset("default", "gpt2_small"))
  return teacher.clone(spec=spec), {"params": inherit(t_vars["params"], spec)}


def run(model, variables, pipeline, mesh, rules, workdir, epochs=1, **overrides):
  c = config()
  c.update(overrides)
  r = train.train_and_evaluate(model, variables, pipeline, c, workdir, seed=0,
                               epochs=epochs, mesh=mesh, sharding_rules=rules,
                               desc=sharding.describe(mesh))
  assert r.history["step"][-1] == STEPS * epochs, r.history["step"]
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)).tolist(),
                        {"params": r.state.params, "batch_stats": r.state.batch_stats})
  leaves = jax.tree_util.tree_flatten_with_path(r.state.params)[0]
  specs = {jax.tree_util.keystr(p, simple=True, separator="/"): str(x.sharding.spec)
           for p, x in leaves}
  return {"train_loss": r.history["train_loss"][-1], "test_loss": r.history["test_loss"][-1],
          "state": params, "specs": specs, "resumed_from": r.resumed_from}


def meshes(out):
  import tempfile

  results = {}
  cases = {
      "resnet": (resnet, digits_pipeline, "default", "fsdp"),
      "gpt": (gpt, chars_pipeline, "tensor_parallel", "model"),
  }
  with tempfile.TemporaryDirectory() as tmp:
    for name, (build, pipe, rules, second) in cases.items():
      model, variables = build()
      for shape in ((1, 1), (8, 1), (4, 2), (2, 4)):
        devices = jax.devices()[: shape[0] * shape[1]]
        mesh = sharding.make_mesh({"data": shape[0], second: shape[1]}, devices=devices)
        workdir = os.path.join(tmp, f"{name}_{shape[0]}x{shape[1]}")
        results[f"{name} {shape}"] = run(model, variables, pipe(mesh), mesh, rules, workdir)
      if name == "resnet":
        resnet_model, resnet_variables = model, variables
    # The (4, 2) run above, killed after its one epoch, resumed on (2, 4): the checkpoint
    # restores onto the new mesh and the run ends where an uninterrupted one-device run
    # ends. Extended deliberately from one epoch to two (the fingerprint records the
    # epochs).
    model, variables = resnet_model, resnet_variables
    single = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    results["resnet 2 epochs (1, 1)"] = run(model, variables, digits_pipeline(single), single,
                                            "default", os.path.join(tmp, "two_epochs"), epochs=2)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    results["resnet resumed (4, 2) -> (2, 4)"] = run(
        model, variables, digits_pipeline(mesh), mesh, "default", os.path.join(tmp, "resnet_4x2"),
        epochs=2, allow_resume_changes="epochs")
  with open(out, "w") as f:
    json.dump(results, f)


def worker(out, workdir, coordinator, num_processes, process_id):
  distributed.initialize(coordinator, int(num_processes), int(process_id))
  mesh = sharding.make_mesh({"data": -1})
  model, variables = resnet()
  result = run(model, variables, digits_pipeline(mesh), mesh, "default", workdir)
  result["process_count"] = jax.process_count()
  result["devices"] = jax.device_count()
  if distributed.is_primary():
    with open(out, "w") as f:
      json.dump(result, f)


if __name__ == "__main__":
  mode, *args = sys.argv[1:]
  {"meshes": meshes, "worker": worker}[mode](*args)
