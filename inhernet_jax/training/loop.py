"""The trainer's loop: restore, train steps, end-of-epoch evaluation and checkpoints.

`train.train_and_evaluate` builds the state and the jitted steps; `run` takes them
from there with the run directory locked. What a checkpoint carries besides the state
is a `Record` (per-epoch history, the partial epoch's metric sums, the wall time so
far), so a run killed at any moment resumes from its last checkpoint to the same end.

Example:
  ```python
  steps = train_loop.Steps(train_step, eval_step, kind="classification", desc="student",
                           schedule=schedule, steps_per_epoch=100, total_steps=1000,
                           teacher_variables=None, gates_on=False)
  run = train_loop.run(checkpoint, steps, state, pipeline, mesh, config, workdir,
                       fingerprint=fp, allow=())
  ```
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from inhernet_jax.layers import linen as layers
from inhernet_jax.training import progress
from inhernet_jax.training import teardown
from inhernet_jax.parallel import sharding as sharding_lib

# Metrics of one training run, one entry per epoch (epoch 0: before training).
HISTORY_KEYS = (
    "epoch", "step", "train_loss", "train_metric", "test_loss", "test_metric", "lr",
    "examples_per_s", "gate_entropy",
)


@dataclasses.dataclass
class Run:
  """What `train.train_and_evaluate` returns."""

  state: Any
  history: dict[str, list]
  wall_s: float
  gates: dict | None
  resumed_from: int | None


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted steps and what stays fixed while they run."""

  train_step: Callable  # (state, batch, teacher_variables) -> (state, metrics)
  eval_step: Callable  # (params, batch_stats, batch) -> sums
  kind: str
  desc: str
  schedule: Callable
  steps_per_epoch: int
  total_steps: int
  teacher_variables: Any
  gates_on: bool


@dataclasses.dataclass
class Record:
  """What a checkpoint carries besides the state; plain data, restored as saved."""

  history: dict[str, list] = dataclasses.field(
      default_factory=lambda: {k: [] for k in HISTORY_KEYS})
  sums: dict[str, float] = dataclasses.field(default_factory=lambda: _zero_sums())
  wall_s: float = 0.0

  def meta(self, total_steps: int, fingerprint) -> dict:
    return {"history": self.history, "sums": self.sums, "wall_s": self.wall_s,
            "total_steps": total_steps, "fingerprint": fingerprint}


def _zero_sums() -> dict[str, float]:
  return {"loss": 0.0, "metric": 0.0, "count": 0.0}


def metric_name(kind: str) -> str:
  return "accuracy" if kind == "classification" else "bpc"


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


def restore(ckpt_lib, mngr, state, *, fingerprint, allow, desc: str):
  """``(state, record, resumed_from)``: the latest good checkpoint's, or fresh ones."""
  restored = ckpt_lib.restore_latest(mngr, state, fingerprint=fingerprint, allow_changes=allow,
                                     required_meta=("history", "sums", "wall_s"))
  if restored is None:
    return state, Record(), None
  resumed_from, state, meta = restored
  logging.info("%s: resumed from step %d (%s)", desc, resumed_from, mngr.directory)
  return state, Record(meta["history"], meta["sums"], meta["wall_s"]), resumed_from


def run(ckpt_lib, steps: Steps, state, pipeline, mesh, config, workdir, *, fingerprint,
        allow) -> Run:
  """Restores, trains to ``steps.total_steps`` with checkpoints, returns the `Run`."""
  mngr = ckpt_lib.manager(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=config.get("keep_checkpoints", 2),
      async_save=config.get("async_checkpoints", True),
  )
  state, record, resumed_from = restore(ckpt_lib, mngr, state, fingerprint=fingerprint,
                                        allow=allow, desc=steps.desc)
  loop = _Loop(ckpt_lib, mngr, steps, _Sharded(pipeline, mesh), state, record, fingerprint)
  start_step = resumed_from or 0
  if not record.history["epoch"]:  # Epoch 0: the starting point (InherNet's metric at init).
    loop.evaluate_start()
  bar = _progress(config, steps.total_steps, start_step, steps.desc)
  try:
    loop.train(start_step, bar, every=int(config.get("checkpoint_every_steps", 0) or 0),
               log_every=int(config.get("log_every_steps", 0) or 0))
  finally:
    if bar is not None:
      bar.close()
    with teardown.ctrl_c_deferred():  # The checkpoint being written completes first.
      mngr.wait_until_finished()
  if loop.gates is None and steps.gates_on:
    _, _, loop.gates = loop.evaluate()
  mngr.close()
  return Run(state=loop.state, history=record.history, wall_s=record.wall_s, gates=loop.gates,
             resumed_from=resumed_from)


class _Loop:
  """The live part of a run: its state, record, wall clock and last gate statistics."""

  def __init__(self, ckpt_lib, mngr, steps: Steps, pipeline, state, record: Record, fingerprint):
    self.ckpt_lib, self.mngr, self.steps, self.pipeline = ckpt_lib, mngr, steps, pipeline
    self.state, self.record, self.fingerprint = state, record, fingerprint
    self.gates = None
    self.t0 = time.perf_counter()  # Wall time counts everything but the saves.

  def checkpoint(self, step: int):
    self.record.wall_s += time.perf_counter() - self.t0
    self.t0 = time.perf_counter()
    self.ckpt_lib.save(self.mngr, step, self.state,
                       self.record.meta(self.steps.total_steps, self.fingerprint))

  def evaluate(self):
    return evaluate(self.steps.eval_step, self.state.params, self.state.batch_stats,
                    self.pipeline, self.steps.kind)

  def evaluate_start(self):
    test_loss, test_metric, self.gates = self.evaluate()
    _append(self.record.history, epoch=0, step=0, train_loss=None, train_metric=None,
            test_loss=test_loss, test_metric=test_metric, lr=float(self.steps.schedule(0)),
            examples_per_s=None, gate_entropy=_mean_entropy(self.gates))
    self.checkpoint(0)

  def train(self, step: int, bar, *, every: int, log_every: int):
    """Steps from ``step`` to the end; evaluates and saves at each epoch's end."""
    steps = self.steps
    epoch_t0, epoch_step0 = time.perf_counter(), step
    log_t0 = epoch_t0
    while step < steps.total_steps:
      m = self.train_step(step)
      step += 1
      if bar is not None:
        _show_step(bar, m, self.record.sums, steps.kind)
      if log_every and step % log_every == 0:
        log_t0 = self.log_step(step, m, log_every, log_t0)
      if step % steps.steps_per_epoch == 0:
        examples = (step - epoch_step0) * self.pipeline.batch_size
        self.end_epoch(step, m, examples, time.perf_counter() - epoch_t0, bar)
        epoch_t0, epoch_step0 = time.perf_counter(), step
      elif every and step % every == 0:
        self.checkpoint(step)

  def train_step(self, step: int) -> dict:
    """One step on batch ``step``; adds its metrics to the partial epoch's sums."""
    batch = self.pipeline.train_batch(step)
    self.state, metrics = self.steps.train_step(self.state, batch, self.steps.teacher_variables)
    m = jax.device_get(metrics)
    sums = self.record.sums
    sums["loss"] += float(m["loss"]) * float(m["count"])
    sums["metric"] += float(m["metric_sum"])
    sums["count"] += float(m["count"])
    if not math.isfinite(float(m["loss"])):
      raise FloatingPointError(f"{self.steps.desc}: loss is {float(m['loss'])} at step {step + 1}")
    return m

  def log_step(self, step: int, m: dict, log_every: int, log_t0: float) -> float:
    now = time.perf_counter()
    logging.info(
        "%s step %d: loss %.4f %s %.4f lr %.3g grad_norm %.3g, %.1f examples/s", self.steps.desc,
        step, float(m["loss"]), metric_name(self.steps.kind),
        float(m["metric_sum"]) / max(float(m["count"]), 1.0), float(m["lr"]),
        float(m["grad_norm"]), log_every * self.pipeline.batch_size / max(now - log_t0, 1e-9))
    return now

  def end_epoch(self, step: int, m: dict, examples: int, seconds: float, bar):
    """Evaluates, appends the epoch to the history, logs it and saves a checkpoint."""
    test_loss, test_metric, self.gates = self.evaluate()
    history, sums = self.record.history, self.record.sums
    count = max(sums["count"], 1.0)
    _append(history, epoch=step // self.steps.steps_per_epoch, step=step,
            train_loss=sums["loss"] / count, train_metric=sums["metric"] / count,
            test_loss=test_loss, test_metric=test_metric, lr=float(m["lr"]),
            examples_per_s=examples / max(seconds, 1e-9), gate_entropy=_mean_entropy(self.gates))
    self.record.sums = _zero_sums()
    if bar is not None:
      bar.set_postfix(loss=f"{history['train_loss'][-1]:.4f}", test=f"{test_metric:.4f}")
    logging.info("%s epoch %d: train loss %.4f, test %s %.4f", self.steps.desc,
                 history["epoch"][-1], history["train_loss"][-1], metric_name(self.steps.kind),
                 test_metric)
    self.checkpoint(step)


def _show_step(bar, m: dict, sums: dict, kind: str):
  bar.update(1)
  bar.set_postfix({"loss": f"{float(m['loss']):.4f}",
                   metric_name(kind): f"{sums['metric'] / max(sums['count'], 1.0):.4f}",
                   "lr": f"{float(m['lr']):.2e}"})


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


def _mean_entropy(gates: dict | None):
  if not gates:
    return None
  return float(np.mean([g["entropy"] for g in gates.values()]))


def _append(history, **values):
  for k in HISTORY_KEYS:
    history[k].append(values[k])


def _progress(config, total: int, initial: int, desc: str):
  if not config.get("progress", True) or jax.process_index() != 0:
    return None
  # Log lines print above the bar while it is shown (inhernet_jax.training.progress).
  return progress.bar(total=total, initial=initial, desc=desc, unit="step", leave=False,
                      dynamic_ncols=True)
