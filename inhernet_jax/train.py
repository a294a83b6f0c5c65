"""The trainer: one run (teacher, student or InherNet) with checkpoints and metrics.

A flax `TrainState` with ``batch_stats`` (and a FitNet connector when hints are used),
an optax optimizer from `inhernet_jax.optim`, jitted train and eval steps, an epoch loop
with a progress bar, and an orbax checkpoint every ``checkpoint_every_steps`` and at
every epoch end. A run killed at any moment and started again resumes from its last
checkpoint and ends with exactly the same parameters and metrics: the batch of step
``s`` is a pure function of ``(seed, s)`` (`inhernet_jax.data`), dropout keys are
``fold_in(key(seed), s)``, and the partial-epoch metric sums are checkpointed with the
state.

Example::

  run = train.train_and_evaluate(
      model, variables, pipeline, config, workdir / "student_kd", seed=0,
      loss="kd", loss_kwargs={"alpha": 0.3, "temperature": 4.0},
      teacher=(teacher_model, teacher_variables))
  run.history["test_metric"][-1], run.state.params
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from inhernet_jax import integrity, layers
from inhernet_jax import lock as lock_lib
from inhernet_jax import losses as losses_lib
from inhernet_jax import optim
from inhernet_jax import progress
from inhernet_jax import sharding as sharding_lib

_LN2 = math.log(2.0)
# Metrics of one training run, one entry per epoch (epoch 0: before training).
HISTORY_KEYS = (
    "epoch", "step", "train_loss", "train_metric", "test_loss", "test_metric", "lr",
    "examples_per_s", "gate_entropy",
)


class TrainState(train_state.TrainState):
  """flax TrainState plus BatchNorm statistics and an optional FitNet connector.

  Attributes:
    batch_stats: the model's ``batch_stats`` collection (``{}`` for models without
      BatchNorm).
    connector: FitNet `losses.HintConnector` params (``{}`` without hints), trained by
      the same optimizer rule as the model, with its own optimizer state.
    connector_opt_state: ``tx`` state of the connector.
  """

  batch_stats: Any = dataclasses.field(default_factory=dict)
  connector: Any = dataclasses.field(default_factory=dict)
  connector_opt_state: Any = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Hint:
  """FitNet hint: match the student's ``student_layer`` output to the teacher's.

  Layer names are module paths (``"conv"``, ``"block_1"``) whose ``__call__`` output
  (the first element when it returns a tuple) is the feature map.
  """

  student_layer: str
  teacher_layer: str
  weight: float = 1.0


@dataclasses.dataclass
class Run:
  """What `train_and_evaluate` returns."""

  state: TrainState
  history: dict[str, list]
  wall_s: float
  gates: dict | None
  resumed_from: int | None


def metric_name(kind: str) -> str:
  return "accuracy" if kind == "classification" else "bpc"


def _cast(tree, dtype):
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def _feature(intermediates, layer: str):
  node = intermediates
  for part in layer.split("/"):
    if part not in node:
      raise ValueError(f"hint layer {layer!r} not found; top-level modules: {sorted(intermediates)}")
    node = node[part]
  out = node["__call__"][0]
  return out[0] if isinstance(out, tuple) else out


def _capture(layer: str | None):
  if layer is None:
    return False
  return lambda mdl, method: method == "__call__" and "/".join(mdl.path) == layer


def _variables(params, batch_stats):
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def _task_metric(kind: str, logits, labels, mask):
  """Per-batch sums: (cross-entropy sum, metric numerator, count)."""
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  mask = mask.astype(jnp.float32)
  if kind == "classification":
    numerator = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
  else:  # bits per character
    numerator = jnp.sum(ce * mask) / _LN2
  return jnp.sum(ce * mask), numerator, jnp.sum(mask)


def make_train_step(
    model: nn.Module,
    loss_fn: Callable,
    kind: str,
    *,
    schedule: optax.Schedule,
    seed: int,
    teacher: nn.Module | None = None,
    hint: Hint | None = None,
    compute_dtype=jnp.float32,
):
  """``step(state, batch, teacher_variables) -> (state, metrics)``, to be jitted.

  Parameters stay float32 (master copy); with ``compute_dtype=bfloat16`` the forward
  and backward run on bf16 casts of them and of the inputs; losses are float32.
  """
  base_key = jax.random.key(seed)

  def step(state: TrainState, batch, teacher_variables):
    rng = jax.random.fold_in(base_key, state.step)
    x = batch["input"]
    if jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(compute_dtype)
    t_logits = t_feat = None
    if teacher is not None:
      t_vars = _cast(teacher_variables, compute_dtype)
      if hint:
        t_logits, t_state = teacher.apply(
            t_vars, x, train=False, mutable=["intermediates"],
            capture_intermediates=_capture(hint.teacher_layer))
        t_feat = jax.lax.stop_gradient(_feature(t_state["intermediates"], hint.teacher_layer))
      else:
        t_logits = teacher.apply(t_vars, x, train=False)
      t_logits = jax.lax.stop_gradient(t_logits)
    mutable = ["batch_stats"] if state.batch_stats else []
    if hint:
      mutable.append("intermediates")

    def objective(params, connector):
      variables = _variables(_cast(params, compute_dtype), state.batch_stats)
      logits, new_state = model.apply(
          variables, x, train=True, mutable=mutable, rngs={"dropout": rng},
          capture_intermediates=_capture(hint.student_layer if hint else None),
      )
      loss = loss_fn(logits, t_logits, batch["label"], batch["mask"])
      if hint:
        s_feat = _feature(new_state["intermediates"], hint.student_layer)
        loss = loss + hint.weight * losses_lib.fitnet_hint(s_feat, t_feat, connector)
      return loss, (logits, new_state)

    (loss, (logits, new_state)), (grads, c_grads) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True
    )(state.params, state.connector)
    state = state.apply_gradients(grads=grads)
    if hint:
      updates, c_opt = state.tx.update(c_grads, state.connector_opt_state, state.connector)
      state = state.replace(
          connector=optax.apply_updates(state.connector, updates), connector_opt_state=c_opt
      )
    if "batch_stats" in new_state:
      state = state.replace(batch_stats=_cast(new_state["batch_stats"], jnp.float32))
    _, numerator, count = _task_metric(kind, logits, batch["label"], batch["mask"])
    metrics = {
        "loss": loss.astype(jnp.float32), "metric_sum": numerator, "count": count,
        "lr": schedule(state.step - 1), "grad_norm": optax.tree.norm(grads),
    }
    return state, metrics

  return step


def make_eval_step(model: nn.Module, kind: str, *, gates: bool = False, compute_dtype=jnp.float32):
  """``eval_step(params, batch_stats, batch) -> sums`` (loss, metric, count[, gates])."""
  def eval_step(params, batch_stats, batch):
    x = batch["input"]
    if jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(compute_dtype)
    variables = _variables(_cast(params, compute_dtype), batch_stats)
    if gates:
      logits, sown = model.apply(variables, x, train=False, mutable=["intermediates"])
    else:
      logits = model.apply(variables, x, train=False)
    ce, numerator, count = _task_metric(kind, logits, batch["label"], batch["mask"])
    out = {"ce_sum": ce, "metric_sum": numerator, "count": count}
    if gates:
      out["gates"] = layers.gate_arrays(sown.get("intermediates", {}))
    return out

  return eval_step


def evaluate(eval_step, params, batch_stats, pipeline, kind: str) -> tuple[float, float, dict | None]:
  """(mean loss, metric, gate stats) over the whole eval split."""
  ce = numerator = count = 0.0
  gate_sums, batches = None, 0
  batches_iter = pipeline.eval_batches()
  total = getattr(pipeline, "num_eval_batches", 0)
  if total >= 50 and jax.process_index() == 0:  # Long evaluations (ImageNet) get a bar.
    batches_iter = progress.bar(batches_iter, total=total, desc="eval", leave=False)
  for batch in batches_iter:
    out = jax.device_get(eval_step(params, batch_stats, batch))
    ce += float(out["ce_sum"])
    numerator += float(out["metric_sum"])
    count += float(out["count"])
    if "gates" in out:
      gate_sums = out["gates"] if gate_sums is None else jax.tree.map(np.add, gate_sums, out["gates"])
      batches += 1
  count = max(count, 1.0)
  metric = numerator / count
  gates = None
  if gate_sums:
    gates = layers.gate_stats_from_arrays(jax.tree.map(lambda a: np.asarray(a) / batches, gate_sums))
  return ce / count, metric, gates


def _empty_history() -> dict[str, list]:
  return {k: [] for k in HISTORY_KEYS}


def _mean_entropy(gates: dict | None):
  if not gates:
    return None
  return float(np.mean([g["entropy"] for g in gates.values()]))


def train_and_evaluate(
    model: nn.Module,
    variables: dict,
    pipeline,
    config,
    workdir: str | os.PathLike,
    *,
    seed: int,
    epochs: int,
    loss: str = "ce",
    loss_kwargs: dict | None = None,
    teacher: tuple[nn.Module, dict] | None = None,
    hint: Hint | None = None,
    desc: str = "train",
    mesh: jax.sharding.Mesh | None = None,
    sharding_rules=None,
    fingerprint: dict | None = None,
    checkpointer=None,
) -> Run:
  """Trains ``model`` from ``variables`` for ``epochs``; resumes from ``workdir``.

  Args:
    model: the network (teacher, student, or inherited network).
    variables: its initial ``{"params", ["batch_stats"]}`` (from ``init`` or `inherit`).
    pipeline: an `inhernet_jax.data` pipeline (``train_batch(step)``, ``eval_batches()``).
    config: the experiment config; reads ``optimizer`` (see `optim.make_optimizer`),
      ``compute_dtype``, ``checkpoint_every_steps``, ``keep_checkpoints``,
      ``async_checkpoints``, ``log_every_steps``, ``progress``, and
      ``allow_resume_changes`` (comma-separated fingerprint fields a resumed checkpoint
      may differ in, e.g. ``"epochs"`` to extend a finished run; ``"*"``: any).
    workdir: this run's directory (checkpoints under ``workdir/checkpoints``).
    seed: dropout keys derive from it (the data order is the pipeline's).
    epochs: epochs to train.
    loss: a `losses.make_loss` name (``"ce"``, ``"kd"``, ``"dkd"``), or ``"fitnet"``
      (cross-entropy plus the ``hint``).
    loss_kwargs: the loss's options.
    teacher: ``(teacher_model, teacher_variables)`` for KD, DKD and FitNet.
    hint: the FitNet hint (required for ``loss="fitnet"``).
    desc: the progress bar's label.
    mesh: the device mesh (`sharding.make_mesh`; default: data parallel over every
      device). Params and optimizer state are sharded over it by ``sharding_rules``,
      batches over its ``data`` and ``fsdp`` axes; the results do not depend on it.
    sharding_rules: path rules (`sharding.resolve_rules`: None, a `sharding.RULE_SETS`
      name, or ``((regex, action), ...)``).
    fingerprint: more run-defining fields (the experiment's method definition; the
      teacher an InherNet was inherited from, ``teacher``) for the fingerprint checked on
      resume; the trainer adds its own (optimizer, epochs, seed, loss, model, the KD
      teacher's weights by checksum, data provenance, batch size).
    checkpointer: what saves and restores the run: an object with `inhernet_jax.checkpoint`'s
      ``manager``, ``restore_latest`` and ``save`` (default: that module, imported here, so
      importing the trainer needs no orbax).

  Returns:
    A `Run`: the final state, the per-epoch history (epoch 0 is the evaluation before
    training), the wall time summed over restarts, and the final gate statistics.

  Raises:
    checkpoint.CheckpointError: ``workdir`` holds a checkpoint of a different run (the
      differing fingerprint fields are listed), or only damaged ones.
    lock.WorkdirBusy: another process is training in ``workdir``.
    ValueError: the batch size is not divisible by the mesh's data-parallel devices, or a
      sharding rule does not fit a parameter (the message names it).
  """
  kind = pipeline.task.kind
  loss_kwargs = dict(loss_kwargs or {})
  if loss == "fitnet":
    if hint is None or teacher is None:
      raise ValueError(f"{desc}: loss 'fitnet' needs a teacher and a hint (student/teacher layers)")
    loss_fn = losses_lib.make_loss("ce", **loss_kwargs)
  else:
    if hint is not None:
      raise ValueError(f"{desc}: a hint is only used with loss 'fitnet', got loss {loss!r}")
    loss_fn = losses_lib.make_loss(loss, **loss_kwargs)
    if loss in ("kd", "dkd") and teacher is None:
      raise ValueError(f"{desc}: loss {loss!r} needs a teacher")
  compute_dtype = jnp.dtype(config.get("compute_dtype", "float32"))
  # Models with a fixed computation dtype (the CNNs: float32) would promote the bf16
  # casts back to float32; they compute in compute_dtype (params stay float32).
  model = _with_dtype(model, compute_dtype)
  if teacher is not None:
    teacher = (_with_dtype(teacher[0], compute_dtype), teacher[1])
  steps_per_epoch = pipeline.steps_per_epoch
  total_steps = epochs * steps_per_epoch
  tx, schedule = optim.make_optimizer(
      config.optimizer, steps_per_epoch=steps_per_epoch, total_steps=total_steps
  )
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  rules = sharding_lib.resolve_rules(sharding_rules)
  connector = {}
  t_model, t_vars = teacher if teacher is not None else (None, None)
  if hint:
    connector = _init_connector(model, variables, t_model, t_vars, hint, pipeline, seed, desc)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  # Placed by the rules without a host gather, then the state is built by one jitted call
  # whose outputs are born sharded (optimizer moments like their params). The copies
  # matter: the train step donates its state, and inherited params share untouched
  # leaves (and batch_stats) with the teacher, which must survive.
  param_sh = sharding_lib.tree_shardings(mesh, params, rules)
  params = sharding_lib.put(params, param_sh)
  batch_stats = sharding_lib.put(batch_stats, jax.tree.map(lambda _: sharding_lib.replicated(mesh), batch_stats))

  def create(params, batch_stats, connector):
    params, batch_stats, connector = jax.tree.map(
        lambda x: jnp.array(x, copy=True), (params, batch_stats, connector))
    return TrainState.create(
        apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats,
        connector=connector, connector_opt_state=tx.init(connector) if hint else {},
    )

  abstract = jax.eval_shape(create, params, batch_stats, connector)
  state_sh = sharding_lib.state_shardings(mesh, abstract, abstract.params, rules)
  state = jax.jit(create, out_shardings=state_sh)(params, batch_stats, connector)
  if t_vars is not None:
    t_vars = sharding_lib.put(t_vars, sharding_lib.state_shardings(mesh, t_vars, t_vars["params"], rules))
  logging.info("%s: mesh %s; sharded params:\n%s", desc, sharding_lib.describe(mesh),
               sharding_lib.describe_shardings(params, param_sh))
  gates_on = _has_gates(params)

  own = dict(
      epochs=epochs, seed=seed, loss=loss, loss_kwargs=loss_kwargs,
      hint=dataclasses.asdict(hint) if hint else None, optimizer=config.optimizer,
      compute_dtype=str(compute_dtype), batch_size=pipeline.batch_size,
      steps_per_epoch=steps_per_epoch, data=dict(getattr(pipeline, "info", {}) or {}),
      model=integrity._plain(model), model_class=type(model).__name__,
      # The teacher by content: another teacher (retrained, other epochs) is another run.
      teacher=None if t_vars is None else integrity.digest(integrity.checksum(t_vars)))
  run_fingerprint = integrity.fingerprint(**{**own, **(fingerprint or {})})
  allow = tuple(a.strip() for a in str(config.get("allow_resume_changes", "") or "").split(",")
                if a.strip())
  # One writer per run directory (process 0 speaks for a multi-process job).
  workdir_lock = lock_lib.WorkdirLock(workdir) if jax.process_index() == 0 else None
  if workdir_lock is not None:
    workdir_lock.acquire()
  try:
    return _train_loop(
        ckpt_lib=checkpointer if checkpointer is not None else _default_checkpointer(),
        model=model, pipeline=pipeline, config=config, workdir=workdir, seed=seed,
        epochs=epochs, loss_fn=loss_fn, kind=kind, schedule=schedule, t_model=t_model,
        t_vars=t_vars, hint=hint, desc=desc, compute_dtype=compute_dtype,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, mesh=mesh, state=state,
        state_sh=state_sh, gates_on=gates_on, run_fingerprint=run_fingerprint, allow=allow)
  finally:
    if workdir_lock is not None:
      workdir_lock.release()


def _default_checkpointer():
  """`inhernet_jax.checkpoint` (orbax), imported when a run starts."""
  from inhernet_jax import checkpoint

  return checkpoint


def _train_loop(*, ckpt_lib, model, pipeline, config, workdir, seed, epochs, loss_fn, kind, schedule,
                t_model, t_vars, hint, desc, compute_dtype, steps_per_epoch, total_steps, mesh,
                state, state_sh, gates_on, run_fingerprint, allow) -> Run:
  """`train_and_evaluate` past its set-up, with the workdir locked."""
  mngr = ckpt_lib.manager(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=config.get("keep_checkpoints", 2),
      async_save=config.get("async_checkpoints", True),
  )
  history, sums, wall = _empty_history(), {"loss": 0.0, "metric": 0.0, "count": 0.0}, 0.0
  start_step, resumed_from = 0, None
  restored = ckpt_lib.restore_latest(mngr, state, fingerprint=run_fingerprint,
                                     allow_changes=allow,
                                     required_meta=("history", "sums", "wall_s"))
  if restored is not None:
    resumed_from, state, meta = restored
    history, sums, wall = meta["history"], meta["sums"], meta["wall_s"]
    start_step = resumed_from
    logging.info("%s: resumed from step %d (%s)", desc, resumed_from, mngr.directory)

  repl = sharding_lib.replicated(mesh)
  # The state keeps its shardings step after step (out_shardings) and is donated; the
  # batch arrives as global arrays split over the data axes (`shard_batch`).
  train_step = jax.jit(
      make_train_step(model, loss_fn, kind, schedule=schedule, seed=seed, teacher=t_model,
                      hint=hint, compute_dtype=compute_dtype),
      out_shardings=(state_sh, repl), donate_argnums=0,
  )
  eval_step = jax.jit(make_eval_step(model, kind, gates=gates_on, compute_dtype=compute_dtype),
                      out_shardings=repl)
  pipeline = _Sharded(pipeline, mesh)
  gates = None

  def save(step):
    ckpt_lib.save(mngr, step, state, {"history": history, "sums": sums, "wall_s": wall,
                                      "total_steps": total_steps,
                                      "fingerprint": run_fingerprint})

  t0 = time.perf_counter()
  if not history["epoch"]:  # Epoch 0: the starting point (InherNet's metric at init).
    test_loss, test_metric, gates = evaluate(eval_step, state.params, state.batch_stats, pipeline, kind)
    _append(history, epoch=0, step=0, train_loss=None, train_metric=None, test_loss=test_loss,
            test_metric=test_metric, lr=float(schedule(0)), examples_per_s=None,
            gate_entropy=_mean_entropy(gates))
    wall += time.perf_counter() - t0
    t0 = time.perf_counter()
    save(0)

  every = int(config.get("checkpoint_every_steps", 0) or 0)
  log_every = int(config.get("log_every_steps", 0) or 0)
  bar = _progress(config, total_steps, start_step, desc)
  epoch_t0, epoch_step0 = time.perf_counter(), start_step
  log_t0 = epoch_t0
  step = start_step
  try:
    while step < total_steps:
      batch = pipeline.train_batch(step)
      state, metrics = train_step(state, batch, t_vars)
      step += 1
      m = jax.device_get(metrics)
      sums["loss"] += float(m["loss"]) * float(m["count"])
      sums["metric"] += float(m["metric_sum"])
      sums["count"] += float(m["count"])
      if not math.isfinite(float(m["loss"])):
        raise FloatingPointError(f"{desc}: loss is {float(m['loss'])} at step {step}")
      if bar is not None:
        bar.update(1)
        bar.set_postfix({"loss": f"{float(m['loss']):.4f}",
                         metric_name(kind): f"{sums['metric'] / max(sums['count'], 1.0):.4f}",
                         "lr": f"{float(m['lr']):.2e}"})
      if log_every and step % log_every == 0:
        now = time.perf_counter()
        logging.info(
            "%s step %d: loss %.4f %s %.4f lr %.3g grad_norm %.3g, %.1f examples/s", desc,
            step, float(m["loss"]), metric_name(kind),
            float(m["metric_sum"]) / max(float(m["count"]), 1.0), float(m["lr"]),
            float(m["grad_norm"]), log_every * pipeline.batch_size / max(now - log_t0, 1e-9))
        log_t0 = now
      if step % steps_per_epoch == 0:
        seconds = time.perf_counter() - epoch_t0
        examples = (step - epoch_step0) * pipeline.batch_size
        test_loss, test_metric, gates = evaluate(
            eval_step, state.params, state.batch_stats, pipeline, kind)
        count = max(sums["count"], 1.0)
        _append(history, epoch=step // steps_per_epoch, step=step,
                train_loss=sums["loss"] / count, train_metric=sums["metric"] / count,
                test_loss=test_loss, test_metric=test_metric, lr=float(m["lr"]),
                examples_per_s=examples / max(seconds, 1e-9),
                gate_entropy=_mean_entropy(gates))
        sums = {"loss": 0.0, "metric": 0.0, "count": 0.0}
        if bar is not None:
          bar.set_postfix(loss=f"{history['train_loss'][-1]:.4f}",
                          test=f"{test_metric:.4f}")
        logging.info("%s epoch %d: train loss %.4f, test %s %.4f", desc,
                     history["epoch"][-1], history["train_loss"][-1], metric_name(kind),
                     test_metric)
        wall += time.perf_counter() - t0
        t0 = time.perf_counter()
        save(step)
        epoch_t0, epoch_step0 = time.perf_counter(), step
      elif every and step % every == 0:
        wall += time.perf_counter() - t0
        t0 = time.perf_counter()
        save(step)
  finally:
    if bar is not None:
      bar.close()
    mngr.wait_until_finished()
  if gates is None and gates_on:
    _, _, gates = evaluate(eval_step, state.params, state.batch_stats, pipeline, kind)
  mngr.close()
  return Run(state=state, history=history, wall_s=wall, gates=gates, resumed_from=resumed_from)


class _Sharded:
  """A pipeline whose batches are global arrays on ``mesh`` (this process's rows)."""

  def __init__(self, pipeline, mesh):
    for what, size in (("batch_size", pipeline.batch_size),
                       ("eval_batch_size", pipeline.eval_batch_size)):
      slot, slots = sharding_lib.process_batch_slot(mesh, size)
      if (pipeline.process_index, pipeline.process_count) != (slot, slots):
        raise ValueError(
            f"the pipeline feeds share {pipeline.process_index} of {pipeline.process_count} "
            f"of every batch, but on mesh {sharding_lib.describe(mesh)} this process holds "
            f"share {slot} of {slots} ({what}={size}); build it with data.get(..., "
            f"process_index={slot}, process_count={slots}) (sharding.process_batch_slot)")
    self._pipeline, self._mesh = pipeline, mesh

  def __getattr__(self, name):
    return getattr(self._pipeline, name)

  def train_batch(self, step: int):
    return sharding_lib.shard_batch(self._mesh, self._pipeline.train_batch(step),
                                    self._pipeline.batch_size)

  def eval_batches(self):
    for batch in self._pipeline.eval_batches():
      yield sharding_lib.shard_batch(self._mesh, batch, self._pipeline.eval_batch_size)


def _init_connector(model, variables, t_model, t_vars, hint: Hint, pipeline, seed: int, desc: str):
  """FitNet connector params, sized from the hint layers' shapes (`jax.eval_shape`)."""
  example = pipeline.train_batch(0)["input"][:1]
  x = jax.ShapeDtypeStruct(example.shape, example.dtype)

  def feature(m, v, layer):
    def probe(v, x):
      _, state = m.apply(v, x, train=False, mutable=["intermediates"],
                         capture_intermediates=_capture(layer))
      return _feature(state["intermediates"], layer)
    return jax.eval_shape(probe, v, x)

  s_feat = feature(model, variables, hint.student_layer)
  t_feat = feature(t_model, t_vars, hint.teacher_layer)
  if s_feat.shape[:-1] != t_feat.shape[:-1]:
    raise ValueError(
        f"{desc}: hint layers {hint.student_layer!r} {s_feat.shape} and "
        f"{hint.teacher_layer!r} {t_feat.shape} differ in more than the channel axis"
    )
  return losses_lib.HintConnector(t_feat.shape[-1]).init(
      jax.random.fold_in(jax.random.key(seed), 7), jnp.zeros(s_feat.shape, s_feat.dtype))["params"]


def _with_dtype(model: nn.Module, dtype) -> nn.Module:
  if dtype == jnp.float32 or getattr(model, "dtype", None) in (None, dtype):
    return model
  return model.clone(dtype=dtype)


def _has_gates(params) -> bool:
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return any("gate" in jax.tree_util.keystr(p, simple=True, separator="/").split("/")
             for p, _ in paths)


def _append(history, **values):
  for k in HISTORY_KEYS:
    history[k].append(values[k])


def _progress(config, total: int, initial: int, desc: str):
  if not config.get("progress", True) or jax.process_index() != 0:
    return None
  # Log lines print above the bar while it is shown (inhernet_jax.progress).
  return progress.bar(total=total, initial=initial, desc=desc, unit="step", leave=False,
                      dynamic_ncols=True)
