"""The sharded train step `benchmarks.scale` measures: built as the trainer builds it, timed.

`build_sharded_step` makes the trainer's sharded step, state and one synthetic global
batch on a mesh; `measure` compiles and times one case (a model, batch, dtype, mesh) in
this process and returns its figures (step times, XLA's FLOP counts, memory, the matmul
element types, the losses). `benchmarks.scale` runs the cases, in child processes with
the device counts they need, and writes the tables.

Example:
  ```python
  row = measure({"model": "resnet20", "batch": 32, "inherited": False, "dtype": "float32",
                 "model_dtype": None, "mesh": {"data": -1}, "rules": "default", "warmup": 1,
                 "steps": 2, "tiny": True, "fwd_flops": False, "rank": 0.25, "heads": 2,
                 "seed": 0})
  ```
"""

from __future__ import annotations

import math
import time

from absl import logging

from benchmarks.common import build_model, matmul_dtypes


# ---------------------------------------------------------------------- models
def is_transformer(preset_name: str) -> bool:
  from inhernet_jax import models

  return models.family(preset_name) == "transformer"


def _optimizer_config(preset_name: str) -> dict:
  if is_transformer(preset_name):
    return {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 0.05}
  return {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


def _cost(obj) -> dict:
  try:
    cost = obj.cost_analysis()
  except Exception as e:  # noqa: BLE001 (a backend without cost analysis)
    logging.warning("cost analysis failed: %s", e)
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


# ------------------------------------------------------------------- the step
def build_sharded_step(model, mesh, *, input_shape, num_classes, batch_size, compute_dtype,
                       optimizer: dict, rules="default", seed: int = 0):
  """The trainer's sharded step for ``model`` on ``mesh``, state and one global batch.

  ``TrainState.create`` under `sharding.jit_init` (`jax.eval_shape` -> `state_shardings`
  -> jit with those ``out_shardings``, so the state is born sharded), then
  ``jax.jit(train_step, in_shardings=(state_sh, batch_sh, None),
  out_shardings=(state_sh, replicated), donate_argnums=0)`` and a synthetic batch placed
  with `sharding.shard_batch`.

  Returns:
    ``(jitted_step, state, batch, step)``: ``step`` is the unjitted train step.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from inhernet_jax.training import losses
  from inhernet_jax.training import optim
  from inhernet_jax.parallel import sharding
  from inhernet_jax.training import trainer as train

  tx, schedule = optim.make_optimizer(optimizer, steps_per_epoch=100, total_steps=10_000)

  def create(key):
    variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return train.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                   batch_stats=variables.get("batch_stats", {}))

  state, state_sh = sharding.jit_init(create, mesh, lambda s: s.params, rules,
                                      jax.random.key(seed))
  rng = np.random.default_rng(seed)
  host = {
      "input": rng.standard_normal((batch_size, *input_shape)).astype(np.float32),
      "label": rng.integers(0, num_classes, (batch_size,)).astype(np.int32),
      "mask": np.ones((batch_size,), np.float32),
  }
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in host.items()}
  step = train.make_train_step(model, losses.make_loss("ce"), "classification",
                               schedule=schedule, seed=seed, compute_dtype=compute_dtype)
  jitted = jax.jit(step, in_shardings=(state_sh, batch_sh, None),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  return jitted, state, sharding.shard_batch(mesh, host), step


def measure(case: dict) -> dict:
  """Compiles and times one case (see `_case`); returns its figures."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from inhernet_jax import models
  from inhernet_jax.decomposition import accounting
  from inhernet_jax.parallel import sharding
  from inhernet_jax.decomposition.spec import InherSpec

  model, input_shape, classes, preset_name = build_model(case["model"], tiny=case["tiny"])
  compute_dtype = jnp.dtype(case["dtype"])
  if case.get("model_dtype") and "dtype" in getattr(model, "__dataclass_fields__", {}):
    model = model.clone(dtype=jnp.dtype(case["model_dtype"]))
  if case["inherited"]:
    spec = InherSpec(rank=case["rank"], heads=case["heads"],
                     rules=models.preset("default", preset_name))
    model = model.clone(spec=spec)
  mesh = sharding.make_mesh(case["mesh"])
  t0 = time.perf_counter()
  jitted, state, batch, raw_step = build_sharded_step(
      model, mesh, input_shape=input_shape, num_classes=classes, batch_size=case["batch"],
      compute_dtype=compute_dtype, optimizer=_optimizer_config(preset_name),
      rules=case["rules"], seed=case["seed"])
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  params = accounting.param_count(state.params)

  t0 = time.perf_counter()
  lowered = jitted.lower(state, batch, None)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  cost = _cost(compiled)
  lowered_cost = _cost(lowered)
  dtypes = matmul_dtypes(lowered.as_text())
  memory = {}
  try:
    mem = compiled.memory_analysis()
    memory = {k: int(getattr(mem, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
        if hasattr(mem, k)}
  except Exception:  # noqa: BLE001
    pass

  losses_seen = []
  for _ in range(case["warmup"]):
    state, m = compiled(state, batch, None)
    losses_seen.append(float(m["loss"]))
  times = []
  for _ in range(case["steps"]):
    t = time.perf_counter()
    state, m = compiled(state, batch, None)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t)
  # Pipelined: dispatch all steps, block once (what an input-bound-free loop sees).
  t = time.perf_counter()
  for _ in range(case["steps"]):
    state, m = compiled(state, batch, None)
  jax.block_until_ready((state, m))
  pipelined_s = (time.perf_counter() - t) / case["steps"]
  final_loss = float(m["loss"])
  step_s = float(np.median(times))
  out = {
      **{k: case[k] for k in ("model", "batch", "dtype", "rules", "seed")},
      "variant": f"inherited r={case['rank']} H={case['heads']}" if case["inherited"] else "teacher",
      "model_dtype": jnp.dtype(model.dtype).name if getattr(model, "dtype", None) else "none",
      "mesh": sharding.describe(mesh),
      "mesh_shape": dict(mesh.shape),
      "devices": int(mesh.devices.size),
      "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "params": params,
      "init_s": init_s,
      "compile_s": compile_s,
      "step_s_median": step_s,
      "step_s_min": float(np.min(times)),
      "step_s_pipelined": pipelined_s,
      "examples_per_s": case["batch"] / step_s,
      "examples_per_s_pipelined": case["batch"] / pipelined_s,
      "loss_step0": losses_seen[0] if losses_seen else float("nan"),
      "loss_final": final_loss,
      "steps_total": case["warmup"] + 2 * case["steps"],
      # Per device program: the whole step on 1 device, one shard's share on a mesh.
      "flops_per_device_xla": float(cost.get("flops", 0.0)),
      "flops_step_xla_unoptimized": float(lowered_cost.get("flops", 0.0)),
      "bytes_accessed_xla": float(cost.get("bytes accessed", 0.0)),
      "matmul_dtypes": dtypes,
      "memory": memory,
  }
  # The whole step's FLOPs counted on the CPU backend (GPU cost analysis skips convs);
  # on CPU itself (1 device) the compiled count above is that already.
  out["flops_step_cpu_count"] = (
      accounting.forward_flops(raw_step, state, batch, None)
      if jax.default_backend() != "cpu" else 0.0)
  if not all(math.isfinite(v) for v in (out["loss_step0"], final_loss)):
    raise FloatingPointError(f"non-finite loss in {case}: {out['loss_step0']}, {final_loss}")
  if case.get("fwd_flops"):
    variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {
        "params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})})
    x = jax.ShapeDtypeStruct((case["batch"], *input_shape), jnp.float32)
    fwd = accounting.forward_flops(lambda v, x: model.apply(v, x, train=False), variables, x)
    out["flops_forward_x3"] = 3.0 * fwd
  del state, compiled, lowered, batch
  return out
