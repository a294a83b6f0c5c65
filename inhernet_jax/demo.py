"""The quick start's job: teacher -> inherited network -> fine-tuned, on digits.

A small, complete use of the public API (`InherSpec`, `inherit`, a zoo model that is
teacher and inherited network by one field) on real data that ships with scikit-learn.
"""

from __future__ import annotations

import time
import jax
import jax.numpy as jnp
import numpy as np
import optax

from inhernet_jax import data as data_lib
from inhernet_jax.inherit import inherit_report, inherit
from inhernet_jax.models.small import CNN
from inhernet_jax.spec import InherSpec


def _train(model, params, train, epochs, lr, batch_size, seed):
  tx = optax.adam(lr)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch):
    def loss_fn(p):
      logits = model.apply({"params": p}, batch["image"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    for batch in data_lib.batches(train, batch_size, rng):
      params, opt, _ = step(params, opt, batch)
  return params


def accuracy(model, params, data) -> float:
  logits = jax.jit(model.apply)({"params": params}, data["image"])
  return float(jnp.mean(jnp.argmax(logits, -1) == data["label"]))


def _count(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def run(config) -> list[dict]:
  """Runs the demo; returns one row per method (teacher, then per rank x heads)."""
  train, test = data_lib.digits(seed=config.seed)
  teacher = CNN(widths=tuple(config.widths))
  key = jax.random.key(config.seed)
  t0 = time.perf_counter()
  t_params = teacher.init(key, train["image"][:1])["params"]
  t_params = _train(teacher, t_params, train, config.teacher_epochs, config.learning_rate,
                    config.batch_size, config.seed)
  rows = [{
      "method": "teacher", "params": _count(t_params), "acc_at_init": None,
      "acc": accuracy(teacher, t_params, test), "seconds": time.perf_counter() - t0,
  }]
  for rank in config.ranks:
    for heads in config.heads:
      # The classifier stays dense, as in the paper's demo.
      spec = InherSpec(rank=rank, heads=heads, rules=((r"head/kernel", "skip"),))
      student = teacher.clone(spec=spec)
      t0 = time.perf_counter()
      i_params = inherit(t_params, spec)
      at_init = accuracy(student, i_params, test)
      tuned = _train(student, i_params, train, config.finetune_epochs, config.learning_rate,
                     config.batch_size, config.seed + 1)
      rows.append({
          "method": f"InherNet r={rank} H={heads}", "params": _count(i_params),
          "acc_at_init": at_init, "acc": accuracy(student, tuned, test),
          "seconds": time.perf_counter() - t0,
          "energy_kept": min(r["energy"] for r in inherit_report(t_params, spec)),
      })
      scratch = student.init(jax.random.fold_in(key, rank * 10 + heads), train["image"][:1])["params"]
      scratch = _train(student, scratch, train, config.finetune_epochs, config.learning_rate,
                       config.batch_size, config.seed + 1)
      rows.append({
          "method": f"  same net, random init", "params": _count(scratch),
          "acc_at_init": None, "acc": accuracy(student, scratch, test), "seconds": None,
      })
  return rows


def format_rows(rows: list[dict]) -> str:
  lines = [f"{'method':<28} {'params':>8} {'acc@init':>9} {'acc':>7}", "-" * 55]
  for r in rows:
    init = "" if r["acc_at_init"] is None else f"{r['acc_at_init']:.4f}"
    lines.append(f"{r['method']:<28} {r['params']:>8} {init:>9} {r['acc']:>7.4f}")
  return "\n".join(lines)
