"""The trainer: one run (teacher, student or InherNet) with checkpoints and metrics.

A flax `TrainState` with ``batch_stats`` (and a FitNet connector when hints are used),
an optax optimizer from `inhernet_jax.training.optim`, jitted train and eval steps, an epoch loop
with a progress bar, and an orbax checkpoint every ``checkpoint_every_steps`` and at
every epoch end. A run killed at any moment and started again resumes from its last
checkpoint and ends with exactly the same parameters and metrics: the batch of step
``s`` is a pure function of ``(seed, s)`` (`inhernet_jax.data.pipeline`), dropout keys are
``fold_in(key(seed), s)``, and the partial-epoch metric sums are checkpointed with the
state. `train_and_evaluate` reads top-down: loss, set-up (model, optimizer, mesh,
sharded state), fingerprint, jitted steps, then `train_loop.run` (restore, the step
loop, end-of-epoch evaluation and checkpoints) with the run directory locked.

Example:
  ```python
  run = train.train_and_evaluate(
      model, variables, pipeline, config, workdir / "student_kd", seed=0,
      loss="kd", loss_kwargs={"alpha": 0.3, "temperature": 4.0},
      teacher=(teacher_model, teacher_variables))
  run.history["test_metric"][-1], run.state.params
  ```
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax.training import train_state

from inhernet_jax.training import integrity
from inhernet_jax.layers import linen as layers
from inhernet_jax.training import lock as lock_lib
from inhernet_jax.training import losses as losses_lib
from inhernet_jax.training import optim
from inhernet_jax.parallel import sharding as sharding_lib
from inhernet_jax.training import loop as train_loop
from inhernet_jax.common import utils

_LN2 = math.log(2.0)


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
      if getattr(loss_fn, "takes_step", False):  # A DKD warm-up reads the step.
        loss = loss_fn(logits, t_logits, batch["label"], batch["mask"], step=state.step)
      else:
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
) -> train_loop.Run:
  """Trains ``model`` from ``variables`` for ``epochs``; resumes from ``workdir``.

  Args:
    model: the network (teacher, student, or inherited network).
    variables: its initial ``{"params", ["batch_stats"]}`` (from ``init`` or `inherit`).
    pipeline: an `inhernet_jax.data.pipeline` pipeline (``train_batch(step)``, ``eval_batches()``).
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
    checkpointer: what saves and restores the run: an object with `inhernet_jax.training.checkpoint`'s
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
  kwargs = dict(loss_kwargs or {})
  # DKD's warm-up in epochs (mdistiller's 20), turned into steps once they are known.
  warmup_epochs = kwargs.pop("warmup_epochs", None) if loss == "dkd" else None
  if warmup_epochs is not None and (isinstance(warmup_epochs, bool) or not isinstance(
      warmup_epochs, (int, float)) or not warmup_epochs >= 0):
    raise ValueError(f"{desc}: loss_kwargs.warmup_epochs must be a number >= 0, got "
                     f"{warmup_epochs!r}")
  loss_fn = _make_loss_fn(loss, kwargs, teacher, hint, desc)
  setup = _setup(model, variables, pipeline, config, seed=seed, epochs=epochs, teacher=teacher,
                 hint=hint, desc=desc, mesh=mesh, sharding_rules=sharding_rules)
  if warmup_epochs:
    kwargs["warmup_steps"] = max(1, round(warmup_epochs * setup.steps_per_epoch))
    loss_fn = _make_loss_fn(loss, kwargs, teacher, hint, desc)
  run_fingerprint = _fingerprint(setup, pipeline, config, seed=seed, epochs=epochs, loss=loss,
                                 loss_kwargs=dict(loss_kwargs or {}), hint=hint, more=fingerprint)
  steps = _jit_steps(setup, loss_fn, seed=seed, hint=hint, desc=desc)
  with _workdir_locked(workdir):
    return train_loop.run(
        checkpointer if checkpointer is not None else _default_checkpointer(), steps,
        setup.state, pipeline, setup.mesh, config, workdir, fingerprint=run_fingerprint,
        allow=_allowed_changes(config))


def _make_loss_fn(loss: str, loss_kwargs: dict, teacher, hint: Hint | None, desc: str):
  """The ``loss_fn(logits, teacher_logits, labels, mask)``; refuses a setup that lacks parts."""
  if loss == "fitnet":
    if hint is None or teacher is None:
      raise ValueError(f"{desc}: loss 'fitnet' needs a teacher and a hint (student/teacher layers)")
    return losses_lib.make_loss("ce", **loss_kwargs)
  if hint is not None:
    raise ValueError(f"{desc}: a hint is only used with loss 'fitnet', got loss {loss!r}")
  loss_fn = losses_lib.make_loss(loss, **loss_kwargs)
  if loss in ("kd", "dkd") and teacher is None:
    raise ValueError(f"{desc}: loss {loss!r} needs a teacher")
  return loss_fn


@dataclasses.dataclass(frozen=True)
class _Setup:
  """A run's model, optimizer schedule, mesh and freshly built, sharded state."""

  model: nn.Module
  teacher_model: nn.Module | None
  teacher_variables: dict | None
  state: TrainState
  state_shardings: Any
  mesh: jax.sharding.Mesh
  schedule: optax.Schedule
  compute_dtype: Any
  kind: str
  steps_per_epoch: int
  total_steps: int
  gates_on: bool


def _setup(model, variables, pipeline, config, *, seed, epochs, teacher, hint, desc, mesh,
           sharding_rules) -> _Setup:
  """Model in its compute dtype, optimizer, mesh, and the state sharded by the rules."""
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
  state, state_sh = _sharded_state(model, tx, variables, connector, mesh, rules, hint=hint, desc=desc)
  if t_vars is not None:
    t_vars = sharding_lib.put(t_vars, sharding_lib.state_shardings(mesh, t_vars, t_vars["params"], rules))
  return _Setup(model=model, teacher_model=t_model, teacher_variables=t_vars, state=state,
                state_shardings=state_sh, mesh=mesh, schedule=schedule,
                compute_dtype=compute_dtype, kind=pipeline.task.kind,
                steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                gates_on=_has_gates(variables["params"]))


def _sharded_state(model, tx, variables, connector, mesh, rules, *, hint, desc):
  """``(state, state_shardings)``: a `TrainState` placed on ``mesh`` by ``rules``."""
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
  logging.info("%s: mesh %s; sharded params:\n%s", desc, sharding_lib.describe(mesh),
               sharding_lib.describe_shardings(params, param_sh))
  return state, state_sh


def _fingerprint(setup: _Setup, pipeline, config, *, seed, epochs, loss, loss_kwargs, hint,
                 more) -> str:
  """What a checkpoint must match to be resumed: the trainer's fields plus ``more``."""
  own = dict(
      epochs=epochs, seed=seed, loss=loss, loss_kwargs=loss_kwargs,
      hint=dataclasses.asdict(hint) if hint else None, optimizer=config.optimizer,
      compute_dtype=str(setup.compute_dtype), batch_size=pipeline.batch_size,
      steps_per_epoch=setup.steps_per_epoch, data=dict(getattr(pipeline, "info", {}) or {}),
      model=integrity._plain(setup.model), model_class=type(setup.model).__name__,
      # The teacher by content: another teacher (retrained, other epochs) is another run.
      teacher=None if setup.teacher_variables is None
      else integrity.digest(integrity.checksum(setup.teacher_variables)))
  return integrity.fingerprint(**{**own, **(more or {})})


def _allowed_changes(config) -> tuple[str, ...]:
  """``allow_resume_changes`` as a tuple of fingerprint field names."""
  return tuple(a.strip() for a in str(config.get("allow_resume_changes", "") or "").split(",")
               if a.strip())


def _jit_steps(setup: _Setup, loss_fn, *, seed, hint, desc) -> train_loop.Steps:
  """The jitted train and eval steps with the facts the loop needs."""
  repl = sharding_lib.replicated(setup.mesh)
  # The state keeps its shardings step after step (out_shardings) and is donated; the
  # batch arrives as global arrays split over the data axes (`shard_batch`).
  train_step = jax.jit(
      make_train_step(setup.model, loss_fn, setup.kind, schedule=setup.schedule, seed=seed,
                      teacher=setup.teacher_model, hint=hint, compute_dtype=setup.compute_dtype),
      out_shardings=(setup.state_shardings, repl), donate_argnums=0,
  )
  eval_step = jax.jit(make_eval_step(setup.model, setup.kind, gates=setup.gates_on,
                                     compute_dtype=setup.compute_dtype), out_shardings=repl)
  return train_loop.Steps(
      train_step=train_step, eval_step=eval_step, kind=setup.kind, desc=desc,
      schedule=setup.schedule, steps_per_epoch=setup.steps_per_epoch,
      total_steps=setup.total_steps, teacher_variables=setup.teacher_variables,
      gates_on=setup.gates_on)


@contextlib.contextmanager
def _workdir_locked(workdir):
  """One writer per run directory (process 0 speaks for a multi-process job)."""
  workdir_lock = lock_lib.WorkdirLock(workdir) if jax.process_index() == 0 else None
  if workdir_lock is not None:
    workdir_lock.acquire()
  try:
    yield
  finally:
    if workdir_lock is not None:
      workdir_lock.release()


def _default_checkpointer():
  """`inhernet_jax.training.checkpoint` (orbax), imported when a run starts."""
  from inhernet_jax.training import checkpoint

  return checkpoint


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
  return any("gate" in name.split("/") for name, _ in utils.flatten_with_names(params))
