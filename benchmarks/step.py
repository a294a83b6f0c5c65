r"""Train step and eval forward of inherited networks against their teachers.

For each model (``name:batch``), the teacher and its inherited network (``--rank`` a
fraction of every layer's full rank, ``--heads``, the ``default`` preset: stem and
classifier kept) are timed in one process on the same random batch: a jitted SGD train
step (``value_and_grad`` of the cross-entropy, BatchNorm in train mode, optax momentum,
donated state) and a jitted eval-mode forward. Each row reports the compile time, the
median of ``--steps`` timed calls after ``--warmup``, examples/s, and the element types
of the step's convolutions and dots from the lowered StableHLO (a bf16 step should show
no float32 matmuls). Ratios are inherited over teacher, from the same run.

Each row has a time limit (``--row_budget_s``: once spent, compiles included, each pass
is timed once more at most) and the run one (``--budget_s``: later rows are skipped and
say so). For ``resnet18_cifar`` entries, when torch is importable, two PyTorch rows follow
(`benchmarks.torch_demo`): the same ResNet-18 and the public demo's inherited layer
(eager, bf16 autocast, channels_last). JSON and a Markdown table are written.

Example:
  ```bash
  # 2-core CPU (the default models, a couple of minutes):
  python -m benchmarks.step --out=step_cpu.json
  # One GPU, bf16, within 4 minutes including compiles:
  python -m benchmarks.step --models=resnet18_cifar:256,vit_s16:128 --dtype=bfloat16 \
      --steps=10 --row_budget_s=40 --budget_s=230 --out=step_gpu.json
  ```

Model names: `inhernet_jax.models.NAMES`, plus ``resnet18_cifar`` (the CIFAR ResNet-18
of `benchmarks.common.build_model`).
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

from benchmarks.common import build_model, matmul_dtypes

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program: tests import this
  module beside launchers that define flags of the same names)."""
  flags.DEFINE_list("models", ["resnet32x4:64", "resnet56:64"], "name:batch of each model.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype.")
  flags.DEFINE_float("rank", 0.25, "Inherited networks: rank as a fraction of full rank.")
  flags.DEFINE_integer("heads", 2, "Inherited networks: heads H.")
  flags.DEFINE_integer("warmup", 1, "Untimed calls after compiling.")
  flags.DEFINE_integer("steps", 5, "Timed calls (the median is reported).")
  flags.DEFINE_list("variants", ["teacher", "inherited"], "teacher, inherited (the zoo's "
                    "inherited network) and/or user (the same network by inherit_model).")
  flags.DEFINE_enum("mixing", "auto", ["auto", "weights", "outputs"],
                    "Inherited layers' head mixing (inhernet_jax.layers.mixing).")
  flags.DEFINE_bool("torch", True, "PyTorch teacher and demo-layer rows for resnet18_cifar "
                    "entries, when torch is importable.")
  flags.DEFINE_float("row_budget_s", 60.0, "Per row: once spent (compiles included), each "
                     "pass is timed at most once more.")
  flags.DEFINE_float("budget_s", 240.0, "Whole run: rows that would start later are skipped.")
  flags.DEFINE_integer("interleave", 0, "If > 0: only compare the user-model path with the "
                       "zoo's (benchmarks.step.interleaved), this many interleaved rounds "
                       "of --steps calls each, per model.")
  flags.DEFINE_string("out", "step.json", "Where to write the JSON figures.")
  flags.DEFINE_string("markdown", "", "Where to write the table (default: --out with .md).")


def build(name: str, dtype):
  """``(teacher model, input shape, classes, preset name)``, computing in ``dtype``."""
  import jax.numpy as jnp

  model, shape, classes, preset = build_model(name)
  if hasattr(model, "dtype"):
    model = model.clone(dtype=jnp.dtype(dtype))
  elif dtype != "float32":
    raise ValueError(f"model {name!r} has no dtype field: it cannot compute in {dtype}")
  return model, shape, classes, preset


def _timed(fn, args, warmup: int, steps: int, carry=None, deadline: float | None = None):
  """``(median seconds, calls timed)`` of up to ``steps`` calls (``carry(out) -> args``
  threads donated state); past ``deadline`` (a `time.perf_counter` value) it stops after
  the first timed call."""
  import jax

  for _ in range(warmup):
    out = jax.block_until_ready(fn(*args))
    args = carry(out, args) if carry else args
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
    args = carry(out, args) if carry else args
    if deadline is not None and time.perf_counter() > deadline:
      break
  return statistics.median(times), len(times)


def _build(name: str, batch: int, variant: str, dtype_name: str, *, rank: float, heads: int,
           mixing: str):
  """``(params, batch_stats, train_step, eval_step, tx)`` of one variant (not jitted)."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from inhernet_jax import InherConv, InherDense, InherSpec, models
  from inhernet_jax import inherit

  dtype = jnp.dtype(dtype_name)
  teacher, shape, classes, preset = build(name, dtype_name)
  if mixing != "auto":
    layers = {"conv": InherConv, "dense": InherDense}
    teacher = teacher.clone(**{f: functools.partial(cls, mixing=mixing)
                               for f, cls in layers.items() if hasattr(teacher, f)})
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, *shape)), dtype)
  y = jnp.asarray(rng.integers(0, classes, batch))
  variables = jax.jit(lambda k: teacher.init(k, x[:1], train=False))(jax.random.key(0))
  model = teacher
  if variant == "inherited":
    spec = InherSpec(rank=rank, heads=heads, rules=models.preset("default", preset))
    variables = {**variables, "params": inherit(variables["params"], spec)}
    model = teacher.clone(spec=spec)
  elif variant == "user":  # The same network, the teacher read as a user's own model.
    from inhernet_jax import inherit_model

    spec = InherSpec(rank=rank, heads=heads, rules=models.preset("default", preset))
    model, variables = inherit_model(teacher, variables, spec, x[:1],
                                     apply_kwargs={"train": False}, mixing=mixing)
  params, stats = variables["params"], variables.get("batch_stats", {})
  tx = optax.sgd(0.01, momentum=0.9)

  def loss_fn(p, s):
    mutable = ["batch_stats"] if s else False
    out = model.apply({"params": p, "batch_stats": s} if s else {"params": p}, x, train=True,
                      mutable=mutable, rngs={"dropout": jax.random.key(1)})
    logits, new = out if mutable else (out, {})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    return loss.mean(), new.get("batch_stats", s)

  def train_step(p, s, opt):
    (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, s)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), s, opt, loss

  def eval_step(p, s):
    return model.apply({"params": p, "batch_stats": s} if s else {"params": p}, x, train=False)

  return params, stats, train_step, eval_step, tx


def measure(name: str, batch: int, variant: str, dtype_name: str, *, rank: float = 0.25,
            heads: int = 2, warmup: int = 1, steps: int = 5, mixing: str = "auto",
            budget_s: float | None = None) -> dict:
  """One row: a model's train step and eval forward (``rank``: a fraction of every
  layer's full rank; the median of ``steps`` calls after ``warmup``).

  ``mixing``: the inherited layers' head mixing (`inhernet_jax.layers.mixing`). ``budget_s``:
  the row's time limit; once spent (compiles included) each pass is timed once more at
  most (a compile itself cannot be cut short) and ``*_steps`` says how many calls were.
  """
  import jax
  import jax.numpy as jnp

  from inhernet_jax.decomposition import accounting

  start = time.perf_counter()
  deadline = None if budget_s is None else start + budget_s
  params, stats, train_step, eval_step, tx = _build(
      name, batch, variant, dtype_name, rank=rank, heads=heads, mixing=mixing)
  row = {"model": name, "batch": batch, "variant": variant, "dtype": dtype_name,
         "params": accounting.param_count(params),
         "mixing": mixing if variant in ("inherited", "user") else ""}
  state = (params, stats, tx.init(params))
  for what, fn, args, carry in (
      ("train", jax.jit(train_step, donate_argnums=(0, 1, 2)), state, lambda o, a: o[:3]),
      ("eval", jax.jit(eval_step), (params, stats), None)):
    lowered = fn.lower(*args)
    t = time.perf_counter()
    compiled = lowered.compile()
    row[f"{what}_compile_s"] = time.perf_counter() - t
    row[f"{what}_matmul_dtypes"] = matmul_dtypes(lowered.as_text())
    if what == "train":  # Fresh buffers: the timed calls donate theirs.
      args = jax.tree.map(jnp.copy, args)
    seconds, row[f"{what}_steps"] = _timed(compiled, args, warmup, steps, carry, deadline)
    row[f"{what}_ms"] = seconds * 1e3
    row[f"{what}_examples_per_s"] = batch / seconds
  row["row_s"] = time.perf_counter() - start
  return row


def interleaved(name: str, batch: int, dtype_name: str = "float32", *, rank: float = 0.25,
                heads: int = 2, mixing: str = "auto", rounds: int = 11, calls: int = 3) -> dict:
  """The user-model path against the zoo's, in one process, interleaved.

  Builds the zoo's inherited network (``teacher.clone(spec=...)``) and the same network
  by `inherit_model` on the teacher, compiles both train steps, then for ``rounds``
  rounds times ``calls`` steps of each (the order alternating each round), so that load
  on a shared machine hits both alike. Returns the per-round ratios user / zoo (of each
  round's median), their median, minimum and maximum, and whether the two lowered
  programs have the same operations (op counts of the StableHLO) or are the same
  program (the same StableHLO text: the interception costs trace time only).
  """
  import collections
  import re

  import jax
  import jax.numpy as jnp

  steps, ops, texts = {}, {}, {}
  for variant in ("inherited", "user"):
    params, stats, train_step, _, tx = _build(name, batch, variant, dtype_name, rank=rank,
                                              heads=heads, mixing=mixing)
    fn = jax.jit(train_step, donate_argnums=(0, 1, 2))
    args = (params, stats, tx.init(params))
    lowered = fn.lower(*args)
    texts[variant] = lowered.as_text()
    ops[variant] = collections.Counter(re.findall(r"stablehlo\.[a-z_]+", texts[variant]))
    steps[variant] = [lowered.compile(), jax.tree.map(jnp.copy, args)]
  for variant in steps:  # Warm-up.
    compiled, args = steps[variant]
    steps[variant][1] = jax.block_until_ready(compiled(*args))[:3]
  ratios, medians = [], {"inherited": [], "user": []}
  for r in range(rounds):
    order = ("inherited", "user") if r % 2 == 0 else ("user", "inherited")
    for variant in order:
      compiled, args = steps[variant]
      times = []
      for _ in range(calls):
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
        args = out[:3]
      steps[variant][1] = args
      medians[variant].append(statistics.median(times))
    ratios.append(medians["user"][-1] / medians["inherited"][-1])
  return {"model": name, "batch": batch, "dtype": dtype_name, "rounds": rounds, "calls": calls,
          "zoo_train_ms": statistics.median(medians["inherited"]) * 1e3,
          "user_train_ms": statistics.median(medians["user"]) * 1e3,
          "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
          "ratio_max": max(ratios), "ratios": ratios,
          "same_ops": ops["inherited"] == ops["user"],
          "same_program": texts["inherited"] == texts["user"]}


def with_ratios(rows: list[dict]) -> list[dict]:
  """Adds ``*_vs_teacher`` to each inherited row (its model's teacher, same run)."""
  teachers = {(r["model"], r["batch"], r["dtype"]): r for r in rows
              if r["variant"] == "teacher" and "skipped" not in r}
  zoo = {(r["model"], r["batch"], r["dtype"]): r for r in rows
         if r["variant"] == "inherited" and "skipped" not in r}
  for r in rows:
    t = teachers.get((r["model"], r["batch"], r["dtype"]))
    if t is not None and r["variant"] != "teacher" and "skipped" not in r:
      for what in ("train", "eval"):
        r[f"{what}_vs_teacher"] = r[f"{what}_ms"] / t[f"{what}_ms"]
    z = zoo.get((r["model"], r["batch"], r["dtype"]))
    if z is not None and r["variant"] == "user" and "skipped" not in r:
      for what in ("train", "eval"):  # `inherit_model` against the zoo's inherited network.
        r[f"{what}_vs_zoo"] = r[f"{what}_ms"] / z[f"{what}_ms"]
  return rows


def markdown(rows: list[dict], device: str, steps: int) -> str:
  lines = [f"Device: {device}. Median of up to {steps} calls; ratios: inherited / teacher "
           "(torch: demo / teacher).", "",
           "| model | batch | dtype | variant | mixing | params | compile train / eval | "
           "train step | train / teacher | eval forward | eval / teacher | matmul dtypes (train) |",
           "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    head = f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['variant']} |"
    if "skipped" in r:
      lines.append(f"{head} | | | skipped: {r['skipped']} | | | | |")
      continue
    ratio = lambda k: f"{r[k]:.2f}x" if k in r else ""  # noqa: E731
    lines.append(
        f"{head} {r.get('mixing', '')} | {r['params']:,} | "
        f"{r['train_compile_s']:.1f} s / {r['eval_compile_s']:.1f} s | {r['train_ms']:.1f} ms | "
        f"{ratio('train_vs_teacher')} | {r['eval_ms']:.1f} ms | {ratio('eval_vs_teacher')} | "
        f"{r['train_matmul_dtypes']} |")
  return "\n".join(lines)


def run(models: list[str], *, dtype: str, rank: float, heads: int, warmup: int, steps: int,
        variants=("teacher", "inherited"), mixing: str = "auto", torch: bool = True,
        row_budget_s: float | None = None, budget_s: float | None = None, log=print,
        torch_kwargs=None) -> list[dict]:
  """Every row of a run, with ratios. ``models``: ``"name:batch"`` entries; ``torch``: also
  the PyTorch teacher and demo rows for each ``resnet18_cifar`` entry when torch is
  importable. Rows that would start after ``budget_s`` seconds are ``skipped``."""
  from benchmarks import torch_demo

  start = time.perf_counter()
  jobs = []
  for entry in models:
    name, _, batch = entry.partition(":")
    if not batch.isdigit():
      raise ValueError(f"models entry {entry!r}: expected name:batch, e.g. resnet56:64")
    jobs += [(name, int(batch), v) for v in variants]
    if torch and name == "resnet18_cifar" and torch_demo.available():
      jobs.append((name, int(batch), "torch"))
  rows = []
  for name, batch, variant in jobs:
    if budget_s is not None and time.perf_counter() - start > budget_s:
      rows.append({"model": name, "batch": batch, "variant": variant, "dtype": dtype,
                   "skipped": f"run budget of {budget_s:.0f} s spent"})
    elif variant == "torch":
      rows += torch_demo.torch_rows(batch, rank=rank, heads=heads, dtype_name=dtype,
                                    warmup=warmup, steps=steps, budget_s=row_budget_s,
                                    **(torch_kwargs or {}))
    else:
      rows.append(measure(name, batch, variant, dtype, rank=rank, heads=heads, warmup=warmup,
                          steps=steps, mixing=mixing, budget_s=row_budget_s))
    log(json.dumps(rows[-1]))
  return with_ratios(rows)


def main(argv):
  del argv
  import jax

  from inhernet_jax.common import utils

  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {jax.device_count()} device(s))"
  if FLAGS.interleave > 0:
    rows = []
    for entry in FLAGS.models:
      name, _, batch = entry.partition(":")
      rows.append(interleaved(name, int(batch), FLAGS.dtype, rank=FLAGS.rank, heads=FLAGS.heads,
                              mixing=FLAGS.mixing, rounds=FLAGS.interleave, calls=FLAGS.steps))
      print(json.dumps(rows[-1]), flush=True)
    utils.write_json(FLAGS.out, {"device": device, "rows": rows}, indent=1)
    return
  t = time.perf_counter()
  try:
    rows = run(FLAGS.models, dtype=FLAGS.dtype, rank=FLAGS.rank, heads=FLAGS.heads,
               warmup=FLAGS.warmup, steps=FLAGS.steps, variants=FLAGS.variants,
               mixing=FLAGS.mixing, torch=FLAGS.torch, row_budget_s=FLAGS.row_budget_s,
               budget_s=FLAGS.budget_s, log=lambda line: print(line, flush=True))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  total = time.perf_counter() - t
  table = markdown(rows, device, FLAGS.steps) + f"\n\nWhole run: {total:.0f} s."
  print(table)
  utils.write_json(FLAGS.out, {"device": device, "total_s": total, "rows": rows, "flags": {
      k: FLAGS[k].value for k in ("models", "dtype", "rank", "heads", "warmup", "steps", "mixing",
                                  "row_budget_s", "budget_s")}}, indent=1)
  md = FLAGS.markdown or FLAGS.out.rsplit(".", 1)[0] + ".md"
  with open(md, "w") as f:
    f.write(table + "\n")
  print(f"wrote {FLAGS.out} and {md}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
