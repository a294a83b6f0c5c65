r"""The Fashion-MNIST teacher's train step: JAX (XLA:CPU) against PyTorch, interleaved.

The same CIFAR-style ResNet (RepDistiller's ``resnet<depth>``: 3x3 stem, three stages of
``(depth - 2) / 6`` basic blocks, 1x1-conv projection shortcuts, BatchNorm after every
conv) on the same batch of 28x28 grey images, 10 classes, float32: a jitted SGD-momentum
train step (cross-entropy, BatchNorm in train mode, donated state) in JAX, and the eager
PyTorch step (``loss.backward(); opt.step()``) in NCHW and in channels_last. The timed
calls alternate JAX / torch / torch channels_last ``--rounds`` times in this one process,
so the machine's load (other processes) hits all of them alike; the report gives each
one's median over the rounds and the ratios of the medians.

XLA:CPU flags are read when jax starts, so each ``--xla_variants`` entry runs in a
subprocess of its own (``XLA_FLAGS`` set), timing JAX and torch interleaved there too:
every row's ratio comes from one process.

Example:
  ```bash
  python -m benchmarks.teacher_step --depth=20 --batch=128 --out=/tmp/teacher_step.json
  python -m benchmarks.teacher_step --depth=20 --xla_variants=default,no_thunks,one_thread
  ```
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

_DEPTH = flags.DEFINE_integer("depth", 20, "ResNet depth (6n + 2).")
_WIDTHS = flags.DEFINE_list("widths", ["16", "16", "32", "64"], "Stem and stage widths.")
_BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Interleaved timed rounds.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls of each before the rounds.")
_VARIANTS = flags.DEFINE_list(
    "xla_variants", [], "Run each named XLA_FLAGS variant (VARIANTS) in its own subprocess; "
    "empty: this process only, with the XLA_FLAGS it has.")
_OUT = flags.DEFINE_string("out", "", "Write the rows as JSON here.")

# XLA:CPU options tried (jax 0.10's CPU client): the default thunk runtime, the legacy
# runtime, Eigen's thread pool off (one intra-op thread), and the fast-math toggle.
VARIANTS = {
    "default": "",
    "no_thunks": "--xla_cpu_use_thunk_runtime=false",
    "one_thread": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}


def _torch_model(depth: int, widths, classes: int = 10):
  import torch
  from torch import nn

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.short = None
      if stride != 1 or cin != cout:
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return torch.relu(y + (x if self.short is None else self.short(x)))

  n = (depth - 2) // 6
  layers = [nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
  cin = widths[0]
  for i, w in enumerate(widths[1:]):
    for j in range(n):
      layers.append(Block(cin, w, 2 if i > 0 and j == 0 else 1))
      cin = w
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
  return nn.Sequential(*layers)


def _jax_step(depth: int, widths, batch: int):
  import jax
  import jax.numpy as jnp
  import optax
  from inhernet_jax.models import cifar

  model = cifar._resnet(depth, tuple(widths))(num_classes=10)
  x = jnp.asarray(jax.random.normal(jax.random.key(0), (batch, 28, 28, 1)))
  y = jnp.arange(batch) % 10
  variables = model.init(jax.random.key(1), x[:1], train=False)
  tx = optax.sgd(0.05, momentum=0.9)
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

  def step(state, x, y):
    params, stats, opt = state

    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), new["batch_stats"], opt), loss

  step = jax.jit(step, donate_argnums=0)
  box = [state]

  def call():
    box[0], loss = step(box[0], x, y)
    loss.block_until_ready()

  return call


def _torch_step(depth: int, widths, batch: int, channels_last: bool):
  import torch

  torch.manual_seed(0)
  model = _torch_model(depth, widths)
  x = torch.randn(batch, 1, 28, 28)
  y = torch.arange(batch) % 10
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
  model.train()

  def call():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()

  return call


def measure(depth: int, widths, batch: int, rounds: int, warmup: int) -> dict:
  """Interleaved medians (seconds per step) of JAX, torch NCHW and torch channels_last."""
  import torch

  calls = {"jax": _jax_step(depth, widths, batch),
           "torch_nchw": _torch_step(depth, widths, batch, False),
           "torch_channels_last": _torch_step(depth, widths, batch, True)}
  t0 = time.perf_counter()
  calls["jax"]()
  compile_s = time.perf_counter() - t0
  for call in calls.values():
    for _ in range(warmup):
      call()
  times = {k: [] for k in calls}
  for _ in range(rounds):
    for k, call in calls.items():
      t = time.perf_counter()
      call()
      times[k].append(time.perf_counter() - t)
  med = {k: statistics.median(v) for k, v in times.items()}
  return {"depth": depth, "widths": list(widths), "batch": batch, "rounds": rounds,
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "torch_threads": torch.get_num_threads(),
          "jax_compile_s": compile_s, "median_s": med,
          "jax_over_torch_nchw": med["jax"] / med["torch_nchw"],
          "jax_over_torch_channels_last": med["jax"] / med["torch_channels_last"]}


def _subprocess(variant: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=VARIANTS[variant])
  cmd = [sys.executable, "-m", "benchmarks.teacher_step", f"--depth={_DEPTH.value}",
         f"--widths={','.join(_WIDTHS.value)}", f"--batch={_BATCH.value}",
         f"--rounds={_ROUNDS.value}", f"--warmup={_WARMUP.value}", "--out=/dev/stdout"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if out.returncode:
    return {"variant": variant, "error": out.stderr[-2000:]}
  row = json.loads(out.stdout.strip().splitlines()[-1])
  row["variant"] = variant
  return row


def main(argv):
  del argv
  widths = [int(w) for w in _WIDTHS.value]
  if _VARIANTS.value:
    unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
    if unknown:
      raise app.UsageError(f"--xla_variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    rows = []
    for v in _VARIANTS.value:  # Written after each variant: a killed run keeps its rows.
      rows.append(_subprocess(v))
      if _OUT.value and _OUT.value != "/dev/stdout":
        with open(_OUT.value, "w") as f:
          json.dump(rows, f, indent=1)
  else:
    rows = [measure(_DEPTH.value, widths, _BATCH.value, _ROUNDS.value, _WARMUP.value)]
  text = json.dumps(rows if _VARIANTS.value else rows[0])
  if _OUT.value == "/dev/stdout":
    print(text)
    return
  for r in rows:
    if "error" in r:
      print(f"{r['variant']}: failed\n{r['error']}")
      continue
    m = r["median_s"]
    print(f"{r.get('variant', 'this process')}: jax {m['jax'] * 1e3:.1f} ms, torch NCHW "
          f"{m['torch_nchw'] * 1e3:.1f} ms, torch channels_last {m['torch_channels_last'] * 1e3:.1f}"
          f" ms; jax/torch {r['jax_over_torch_nchw']:.2f} (NCHW), "
          f"{r['jax_over_torch_channels_last']:.2f} (channels_last)")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
