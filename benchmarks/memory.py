r"""Per-device memory of a sharded `inherit`: a LLaMA-2-7B-shaped teacher.

Three figures, printed and written as JSON:

1. ``plan``: the full 7B-shaped stack (32 scan-stacked layers, width 4096, SwiGLU MLP
   11008, vocabulary 32000; 6.74B parameters) as abstract params sharded over an
   8-device CPU mesh (``--mesh``, default ``fsdp=8``): nothing is allocated. Every
   jitted stage of the sharded path (`inhernet_jax.decomposition.sharded.sharded_stages`) is lowered
   and compiled on its abstract sharded inputs; `plan_memory` walks the schedule
   (teacher resident + new params made so far + the bases of the kernels iterated
   together + the current stage's output and compiled temp bytes) and gives the peak
   per-device bytes, against the teacher's per-device parameter bytes.
2. ``real``: a reduced-width stack (width 512, MLP 1376, 8 layers, vocabulary 4000,
   the rank scaled with the width) really inherited on the same CPU mesh: after every
   stage the per-device bytes of the live arrays (`jax.live_arrays`, shard by shard)
   plus the stage's compiled temp bytes; the peak; the plan of the same run; wall
   times (cold: compiles included; warm).
3. ``device`` (``--device``, the default when an accelerator is present): the full
   stack really allocated on one accelerator (``--dtype`` float32 or bfloat16) and
   inherited on a one-device mesh (the kernel-by-kernel path), with the allocator's
   ``peak_bytes_in_use`` against the teacher's bytes, and the plan on that device.

4. ``baseline`` (``--baseline``): the same inheritance done the naive way, every layer
   slice of every factorised kernel through a full ``jnp.linalg.svd`` then truncated
   (a per-layer loop over ``torch.linalg.svd``, in JAX), against our path, both on ONE
   device: on the CPU the reduced stack (time, and peak bytes as live arrays + compiled
   temp bytes after every call), on an accelerator (``--device``) the full stack
   (time and ``peak_bytes_in_use``; each method in its own process, as the allocator's
   peak never resets). ``--baseline_layers=N`` runs the baseline on the first N layers
   of each stacked kernel only and extrapolates its time linearly (reported as such).

Parameter names follow `models.transformer` (``blocks/attn/{query,key,value,out}``,
``blocks/mlp/{fc1,fc2}``, ``head``) plus ``blocks/mlp/fc1_gate`` (SwiGLU's gate
projection, sharded like ``fc1``); LLaMA has no biases, so a rule declares the layer
axis of the ``blocks`` kernels. The CPU parts need 8 devices: the launcher re-runs
itself with ``--xla_force_host_platform_device_count`` when it has fewer.

Pieces: the teacher and how a run is measured, `benchmarks.memory_teacher`; the schedule
walk, `benchmarks.memory_plan`; the full-SVD baseline, `benchmarks.memory_baseline`.

Example:
  ```bash
  python -m benchmarks.memory --out=memory.json                # CPU: plan + real
  python -m benchmarks.memory --device --dtype=bfloat16 --out=memory_gpu.json
  python -m benchmarks.memory --baseline --noplan --noreal --out=baseline.json  # CPU
  python -m benchmarks.memory --device --baseline --out=baseline_gpu.json      # GPU
  ```
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.memory_baseline import run_baseline_cpu, run_device_full_svd
from benchmarks.memory_teacher import (Shape, bytes_per_device, count_params, param_shapes,
                                       random_teacher, sharded, spec, timed_inherit)
from inhernet_jax.common import utils

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "memory.json", "Where to write the JSON figures.")
flags.DEFINE_integer("rank", 512, "Rank of the inherited layers of the 7B-shaped stack.")
flags.DEFINE_integer("heads", 2, "Expert up-projections H.")
flags.DEFINE_string("mesh", "fsdp=8", "CPU mesh: axis=size pairs, e.g. fsdp=8 or data=2,fsdp=4.")
flags.DEFINE_enum("rules", "default", ["default", "tensor_parallel"], "Sharding rules.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Teacher dtype.")
flags.DEFINE_bool("plan", True, "Plan the full 7B-shaped stack (abstract, on the CPU mesh).")
flags.DEFINE_bool("real", True, "Really inherit the reduced-width stack on the CPU mesh.")
flags.DEFINE_bool("device", None, "Really inherit the full stack on one accelerator "
                  "(default: when an accelerator is present).")
flags.DEFINE_list("full_shape", ["32", "4096", "11008", "32000"],
                  "layers,width,mlp,vocab of the full stack (default: LLaMA-2-7B's).")
flags.DEFINE_integer("reduced_width", 512, "Width of the really inherited CPU stack.")
flags.DEFINE_integer("reduced_mlp", 1376, "MLP width of the really inherited CPU stack.")
flags.DEFINE_integer("reduced_layers", 8, "Layers of the really inherited CPU stack.")
flags.DEFINE_integer("reduced_vocab", 4000, "Vocabulary of the really inherited CPU stack.")
flags.DEFINE_bool("baseline", False, "Also time a per-layer full SVD against our path, "
                  "on one device (see the module docstring).")
flags.DEFINE_enum("spectrum", "gaussian", ["gaussian", "power_law"], "The CPU baseline's "
                  "random teacher: Gaussian kernels (flat spectra: the randomized SVD's worst "
                  "case) or singular values s_i = 1/i (decaying, like trained weights).")
flags.DEFINE_integer("baseline_layers", 0, "Layers of each stacked kernel the full-SVD "
                     "baseline really runs (0: all); the rest is extrapolated.")
flags.DEFINE_enum("method", None, ["inherit", "full_svd"], "Internal: the one method a "
                  "--device --baseline child process measures.")
flags.DEFINE_bool("child", False, "Internal: already re-run with the CPU device count.")


def _full_shape() -> Shape:
  return Shape(*(int(x) for x in FLAGS.full_shape))
# Tensor parallelism for the SwiGLU gate projection, as for fc1.
_GATE_TP_RULES = (
    (r"(.*/)?fc1_gate/kernel", ("fsdp", "model")),
    (r"(.*/)?fc1_gate/down/kernel", ("fsdp", None)),
    (r"(.*/)?fc1_gate/up/kernel", (None, None, "model")),
)


def _mesh_axes() -> dict:
  axes = {}
  for item in FLAGS.mesh.split(","):
    name, _, size = item.partition("=")
    axes[name.strip()] = int(size)
  return axes


def _rules():
  from inhernet_jax.parallel import sharding

  if FLAGS.rules == "tensor_parallel":
    return _GATE_TP_RULES + tuple(sharding.TENSOR_PARALLEL_RULES)
  return sharding.resolve_rules(FLAGS.rules)


def _plan(abstract, inherit_spec, mesh, rules) -> dict:
  """Compiles every stage on abstract inputs and walks the schedule."""
  from benchmarks.memory_plan import device_bytes, plan_memory
  from inhernet_jax.decomposition.transform import planned_param_count
  from inhernet_jax.decomposition.sharded import sharded_stages

  start = time.time()
  stages = sharded_stages(abstract, inherit_spec, mesh=mesh, sharding_rules=rules)
  teacher = device_bytes(abstract)
  rows = plan_memory(stages, teacher)
  top = max(rows, key=lambda r: r["peak"])
  programs = {(id(s.fn), str([(a.shape, a.sharding) for a in _leaves(s.args)]))
              for s in stages if s.name not in ("start", "gate")}
  return {
      "params_before": count_params(abstract),
      "params_after": planned_param_count(abstract, inherit_spec),
      "teacher_bytes_per_device": teacher,
      "peak_bytes_per_device": top["peak"],
      "ratio": top["peak"] / teacher,
      "peak_stage": {k: top[k] for k in ("name", "path", "live", "out", "temp")},
      "stages": len(rows),
      "programs_compiled": len(programs),
      "plan_seconds": time.time() - start,
  }


def _leaves(args):
  import jax

  return jax.tree.leaves(args)


def run_plan(mesh, rules) -> dict:
  import jax.numpy as jnp

  abstract = sharded(param_shapes(_full_shape(), jnp.dtype(FLAGS.dtype)), mesh, rules)
  result = {"shape": dataclasses.asdict(_full_shape()), "rank": FLAGS.rank, "heads": FLAGS.heads,
            "dtype": FLAGS.dtype, **_plan(abstract, spec(FLAGS.rank, FLAGS.heads), mesh, rules)}
  return result


def _reduced():
  """``(shape, rank, spec)`` of the reduced stack (the rank scaled with the width)."""
  shape = Shape(FLAGS.reduced_layers, FLAGS.reduced_width, FLAGS.reduced_mlp, FLAGS.reduced_vocab)
  rank = max(1, FLAGS.rank * shape.width // _full_shape().width)
  return shape, rank, spec(rank, FLAGS.heads)


def run_real(mesh, rules) -> dict:
  """The reduced stack, really inherited on the CPU mesh, measured stage by stage."""
  import jax
  import jax.numpy as jnp
  from benchmarks.memory_plan import stage_temp_bytes

  shape, rank, inherit_spec = _reduced()
  abstract = sharded(param_shapes(shape, jnp.dtype(FLAGS.dtype)), mesh, rules)
  plan = _plan(abstract, inherit_spec, mesh, rules)
  teacher_params = random_teacher(abstract)
  jax.block_until_ready(teacher_params)
  inherit = functools.partial(timed_inherit, teacher_params, inherit_spec, sharding_rules=rules)

  _, cold = inherit()  # Compiles (the plan compiled each stage once more on its own).
  gc.collect()
  teacher = bytes_per_device(jax.tree.leaves(teacher_params))
  other = bytes_per_device(jax.live_arrays()) - teacher
  peaks, per_kernel = [], {}

  def trace(stage):
    live = bytes_per_device(jax.live_arrays()) - other
    peak = live + stage_temp_bytes(stage)
    peaks.append((peak, stage.name, stage.path, live))
    per_kernel[stage.path] = max(per_kernel.get(stage.path, 0), peak)

  out, traced = inherit(trace)
  after = count_params(out)
  del out
  _, warm = inherit()
  peak, name, path, live = max(peaks)
  return {
      "shape": dataclasses.asdict(shape), "rank": rank, "heads": FLAGS.heads, "dtype": FLAGS.dtype,
      "params_before": count_params(teacher_params), "params_after": after,
      "teacher_bytes_per_device": teacher,
      "peak_bytes_per_device": peak, "ratio": peak / teacher,
      "peak_stage": {"name": name, "path": path, "live": live, "temp": peak - live},
      "peak_ratio_per_kernel": {p: b / teacher for p, b in per_kernel.items()},
      "planned_ratio": plan["ratio"],
      "stages_run": len(peaks),
      "seconds_cold": cold, "seconds_warm": warm, "seconds_traced": traced,
  }


def run_device() -> dict:
  """The full stack really allocated on one accelerator and inherited there."""
  import jax
  import jax.numpy as jnp
  import inhernet_jax as ij
  from inhernet_jax.parallel import sharding

  device = jax.devices()[0]
  mesh = sharding.make_mesh({"data": 1}, devices=[device])
  rules = _rules()
  inherit_spec = spec(FLAGS.rank, FLAGS.heads)
  abstract = sharded(param_shapes(_full_shape(), jnp.dtype(FLAGS.dtype)), mesh, rules)
  plan = _plan(abstract, inherit_spec, mesh, rules)
  teacher_params = random_teacher(abstract)
  jax.block_until_ready(teacher_params)
  teacher = bytes_per_device(jax.tree.leaves(teacher_params))
  stats = device.memory_stats() or {}
  after_init = stats.get("peak_bytes_in_use")
  start = time.time()
  out = ij.inherit(teacher_params, inherit_spec, mesh=mesh, sharding_rules=rules)
  jax.block_until_ready(out)
  seconds = time.time() - start
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return {
      "device": str(device), "dtype": FLAGS.dtype, "rank": FLAGS.rank, "heads": FLAGS.heads,
      "shape": dataclasses.asdict(_full_shape()),
      "params_before": count_params(teacher_params), "params_after": count_params(out),
      "teacher_bytes": teacher, "peak_bytes_in_use": peak,
      "peak_bytes_after_teacher_init": after_init,
      "ratio": None if peak is None else peak / teacher,
      "planned_ratio": plan["ratio"], "planned_peak_stage": plan["peak_stage"],
      "seconds": seconds,
      "note": ("peak_bytes_in_use counts from process start; the teacher is initialised "
               "leaf by leaf so that its init peaks below the inherit"),
  }


def _reexec(devices: int) -> int:
  """Runs this launcher again with ``devices`` CPU devices; returns its exit code."""
  env = dict(os.environ)
  flags_now = env.get("XLA_FLAGS", "")
  # The device count goes first: XLA stops reading at a bare token like
  # `intra_op_parallelism_threads=1`.
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {flags_now}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  args = [sys.executable, "-m", "benchmarks.memory", *sys.argv[1:], "--child", "--nodevice"]
  return subprocess.call(args, env=env)


def _device_child(method: str) -> dict:
  """Runs one method in a fresh process (the allocator's peak never resets)."""
  out = f"{FLAGS.out}.{method}.json"
  args = [sys.executable, "-m", "benchmarks.memory", *sys.argv[1:], f"--method={method}",
          f"--out={out}"]
  code = subprocess.call(args)
  if code:
    raise SystemExit(f"the {method} child failed with exit code {code}")
  with open(out) as f:
    return json.load(f)["device"]


def _x(ratio) -> str:
  return "n/a" if ratio is None else f"{ratio:.2f}x"


def _gb(x) -> str:
  return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def _params(r: dict) -> str:
  return f"params {r['params_before']:,} -> {r['params_after']:,}"


def _peak(r: dict, which: str, note: str = "") -> str:
  """The teacher's and the ``which`` ("planned", "measured") peak bytes of a CPU-mesh run,
  and where it peaks (after ``note``), the parenthesis left open."""
  stage = r["peak_stage"]
  return (f"  teacher {_gb(r['teacher_bytes_per_device'])}/device, {which} peak "
          f"{_gb(r['peak_bytes_per_device'])}/device: {r['ratio']:.3f}x "
          f"({note}at {stage['name']} {stage['path']}")


def _print(result: dict) -> None:
  if "plan" in result:
    p = result["plan"]
    print(f"plan {p['shape']} ({p['dtype']}, rank {p['rank']}, H={p['heads']}, mesh {result['mesh']}): "
          f"{_params(p)}")
    print(_peak(p, "planned")
          + f"; {p['programs_compiled']} programs compiled in {p['plan_seconds']:.0f}s)")
  if "real" in result:
    r = result["real"]
    print(f"reduced real run (width {r['shape']['width']}, {r['shape']['layers']} layers, rank "
          f"{r['rank']}): {_params(r)}")
    print(_peak(r, "measured", f"planned {r['planned_ratio']:.3f}x; ")
          + f"); {r['seconds_cold']:.1f}s cold, {r['seconds_warm']:.1f}s warm")
  if "device" in result and "params_before" in result["device"]:
    d = result["device"]
    ratio = "n/a" if d["ratio"] is None else f"{d['ratio']:.3f}x"
    print(f"{d['device']} ({d['dtype']}): {_params(d)}; "
          f"teacher {_gb(d['teacher_bytes'])}, peak in use {_gb(d['peak_bytes_in_use'])}: {ratio} "
          f"(planned {d.get('planned_ratio', float('nan')):.3f}x), {d['seconds']:.1f}s")
  if "baseline" in result:
    b = result["baseline"]
    i, f = b["inherit"], b["full_svd"]
    print(f"baseline on one {b['device']}, {b['spectrum']} teacher (width {b['shape']['width']}, {b['shape']['layers']} "
          f"layers, rank {b['rank']}): ours {i['seconds_warm']:.2f}s warm, peak "
          f"{i['ratio']:.2f}x teacher; per-layer full SVD {f['seconds_estimate']:.2f}s "
          f"({f['slices_run']}/{f['slices']} slices run), peak {f['ratio']:.2f}x; "
          f"speed-up {b['speedup']:.1f}x; error / optimal error {i['error_ratio_vs_full_svd']:.6f}")
  if "device" in result and "slices" in result["device"]:
    d = result["device"]
    print(f"per-layer full SVD on {d['device']} ({d['dtype']}): {d['seconds_estimate']:.1f}s "
          f"({d['slices_run']}/{d['slices']} slices run), peak in use "
          f"{_gb(d['peak_bytes_in_use'])} ({_x(d['ratio'])} teacher)")
  if "device_baseline" in result:
    b = result["device_baseline"]
    for m in ("inherit", "full_svd"):
      d = b[m]
      est = d.get("seconds_estimate", d["seconds"])
      print(f"{m} on {d['device']}: {est:.1f}s, peak in use {_gb(d['peak_bytes_in_use'])} "
            f"({_x(d['ratio'])} teacher)")
    print(f"speed-up of our path over per-layer full SVD: {b['speedup']:.1f}x")


def main(argv):
  del argv
  import jax

  device_mode = FLAGS.device
  if device_mode is None:
    device_mode = jax.default_backend() != "cpu"
  result = {"jax": jax.__version__}
  if device_mode and FLAGS.baseline and FLAGS.method is None:
    result["device_baseline"] = {m: _device_child(m) for m in ("inherit", "full_svd")}
    r = result["device_baseline"]
    r["speedup"] = r["full_svd"]["seconds_estimate"] / r["inherit"]["seconds"]
  elif device_mode and FLAGS.method == "full_svd":
    result["device"] = run_device_full_svd(_full_shape(), FLAGS.rank, FLAGS.heads, FLAGS.dtype,
                                           _rules(), FLAGS.baseline_layers)
  elif device_mode:
    result["device"] = run_device()
  else:
    from inhernet_jax.parallel import sharding

    axes = _mesh_axes()
    needed = 1
    for size in axes.values():
      needed *= size
    if jax.device_count() < needed:
      if FLAGS.child:
        raise SystemExit(f"--mesh={FLAGS.mesh} needs {needed} devices, have {jax.device_count()}")
      raise SystemExit(_reexec(needed))
    mesh = sharding.make_mesh(axes, devices=jax.devices()[:needed])
    result["mesh"] = sharding.describe(mesh)
    rules = _rules()
    if FLAGS.plan:
      result["plan"] = run_plan(mesh, rules)
    if FLAGS.real:
      result["real"] = run_real(mesh, rules)
    if FLAGS.baseline:
      result["baseline"] = run_baseline_cpu(*_reduced(), heads=FLAGS.heads, dtype=FLAGS.dtype,
                                            spectrum=FLAGS.spectrum, layers=FLAGS.baseline_layers)
  # Before printing: a long run's figures are never lost.
  utils.write_json(FLAGS.out, result, indent=2)
  _print(result)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
