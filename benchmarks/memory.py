r"""Per-device memory of a sharded `inherit`: a LLaMA-2-7B-shaped teacher.

Three figures, printed and written as JSON:

1. ``plan``: the full 7B-shaped stack (32 scan-stacked layers, width 4096, SwiGLU MLP
   11008, vocabulary 32000; 6.74B parameters) as abstract params sharded over an
   8-device CPU mesh (``--mesh``, default ``fsdp=8``): nothing is allocated. Every
   jitted stage of the sharded path (`inhernet_jax.inherit_sharded.sharded_stages`) is lowered
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

Run::

  python -m benchmarks.memory --out=memory.json                # CPU: plan + real
  python -m benchmarks.memory --device --dtype=bfloat16 --out=memory_gpu.json
  python -m benchmarks.memory --baseline --noplan --noreal --out=baseline.json  # CPU
  python -m benchmarks.memory --device --baseline --out=baseline_gpu.json      # GPU
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import functools
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

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


@dataclasses.dataclass(frozen=True)
class Shape:
  """A LLaMA-style stack; the defaults are LLaMA-2-7B's."""

  layers: int = 32
  width: int = 4096
  mlp: int = 11008
  vocab: int = 32000


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
  from inhernet_jax import sharding

  if FLAGS.rules == "tensor_parallel":
    return _GATE_TP_RULES + tuple(sharding.TENSOR_PARALLEL_RULES)
  return sharding.resolve_rules(FLAGS.rules)


def param_shapes(shape: Shape, dtype) -> dict:
  """The teacher's params as `jax.ShapeDtypeStruct`s (via `jax.eval_shape`)."""
  import jax
  import jax.numpy as jnp

  def init():
    def kernel(*dims):
      return {"kernel": jnp.zeros(dims, dtype)}

    lw, w, f = (shape.layers, shape.width), shape.width, shape.mlp
    blocks = {
        "attn": {name: kernel(*lw, w) for name in ("query", "key", "value", "out")},
        "mlp": {"fc1": kernel(*lw, f), "fc1_gate": kernel(*lw, f), "fc2": kernel(shape.layers, f, w)},
        "norm1": {"scale": jnp.ones(lw, dtype)},
        "norm2": {"scale": jnp.ones(lw, dtype)},
    }
    return {"embed": {"embedding": jnp.zeros((shape.vocab, w), dtype)}, "blocks": blocks,
            "norm": {"scale": jnp.ones((w,), dtype)}, "head": kernel(w, shape.vocab)}

  return jax.eval_shape(init)


def spec(rank: int, heads: int):
  from inhernet_jax import InherSpec

  # No biases: a rule says the blocks' kernels have one leading layer axis.
  return InherSpec(rank=rank, heads=heads, rules=((r"blocks/.*/kernel", {"stack": 1}),))


def _sharded(shapes, mesh, rules):
  import jax
  from inhernet_jax import sharding

  shardings = sharding.tree_shardings(mesh, shapes, rules)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _random_teacher(abstract, seed=0):
  """Teacher params born sharded (one jitted init per leaf: no host copy, and the
  init's own temporaries stay one leaf's worth)."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  flat = traverse_util.flatten_dict(abstract, sep="/")
  out = {}
  for i, (path, leaf) in enumerate(sorted(flat.items())):
    fan_in = leaf.shape[-2] if path.endswith("kernel") else 1
    scale = 1.0 / float(fan_in) ** 0.5

    def init(key, leaf=leaf, scale=scale):
      return (jax.random.normal(key, leaf.shape, jnp.float32) * scale).astype(leaf.dtype)

    out[path] = jax.jit(init, out_shardings=leaf.sharding)(jax.random.key(seed * 1000 + i))
  return traverse_util.unflatten_dict(out, sep="/")


def _count(tree) -> int:
  import jax
  import numpy as np

  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _bytes_per_device(arrays) -> int:
  from benchmarks.memory_plan import live_bytes_per_device

  return live_bytes_per_device(arrays)


def _plan(abstract, inherit_spec, mesh, rules) -> dict:
  """Compiles every stage on abstract inputs and walks the schedule."""
  from benchmarks.memory_plan import device_bytes, plan_memory
  from inhernet_jax.inherit import planned_param_count
  from inhernet_jax.inherit_sharded import sharded_stages

  start = time.time()
  stages = sharded_stages(abstract, inherit_spec, mesh=mesh, sharding_rules=rules)
  teacher = device_bytes(abstract)
  rows = plan_memory(stages, teacher)
  top = max(rows, key=lambda r: r["peak"])
  programs = {(id(s.fn), str([(a.shape, a.sharding) for a in _leaves(s.args)]))
              for s in stages if s.name not in ("start", "gate")}
  return {
      "params_before": _count(abstract),
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

  abstract = _sharded(param_shapes(_full_shape(), jnp.dtype(FLAGS.dtype)), mesh, rules)
  result = {"shape": dataclasses.asdict(_full_shape()), "rank": FLAGS.rank, "heads": FLAGS.heads,
            "dtype": FLAGS.dtype, **_plan(abstract, spec(FLAGS.rank, FLAGS.heads), mesh, rules)}
  return result


def _reduced():
  """``(shape, rank, spec)`` of the reduced stack (the rank scaled with the width)."""
  shape = Shape(FLAGS.reduced_layers, FLAGS.reduced_width, FLAGS.reduced_mlp, FLAGS.reduced_vocab)
  rank = max(1, FLAGS.rank * shape.width // _full_shape().width)
  return shape, rank, spec(rank, FLAGS.heads)


def _timed_inherit(teacher_params, inherit_spec, trace=None, **kwargs):
  """``(inherit(teacher_params, inherit_spec, **kwargs), seconds)``; its stages traced by
  ``trace`` when given."""
  import inhernet_jax as ij
  from inhernet_jax.inherit_sharded import tracing

  start = time.time()
  with tracing(trace) if trace else contextlib.nullcontext():
    out = ij.inherit(teacher_params, inherit_spec, **kwargs)
    jax.block_until_ready(out)
  return out, time.time() - start


def run_real(mesh, rules) -> dict:
  """The reduced stack, really inherited on the CPU mesh, measured stage by stage."""
  import jax
  import jax.numpy as jnp
  from benchmarks.memory_plan import stage_temp_bytes

  shape, rank, inherit_spec = _reduced()
  abstract = _sharded(param_shapes(shape, jnp.dtype(FLAGS.dtype)), mesh, rules)
  plan = _plan(abstract, inherit_spec, mesh, rules)
  teacher_params = _random_teacher(abstract)
  jax.block_until_ready(teacher_params)
  inherit = functools.partial(_timed_inherit, teacher_params, inherit_spec, sharding_rules=rules)

  _, cold = inherit()  # Compiles (the plan compiled each stage once more on its own).
  gc.collect()
  teacher = _bytes_per_device(jax.tree.leaves(teacher_params))
  other = _bytes_per_device(jax.live_arrays()) - teacher
  peaks, per_kernel = [], {}

  def trace(stage):
    live = _bytes_per_device(jax.live_arrays()) - other
    peak = live + stage_temp_bytes(stage)
    peaks.append((peak, stage.name, stage.path, live))
    per_kernel[stage.path] = max(per_kernel.get(stage.path, 0), peak)

  out, traced = inherit(trace)
  after = _count(out)
  del out
  _, warm = inherit()
  peak, name, path, live = max(peaks)
  return {
      "shape": dataclasses.asdict(shape), "rank": rank, "heads": FLAGS.heads, "dtype": FLAGS.dtype,
      "params_before": _count(teacher_params), "params_after": after,
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
  from inhernet_jax import sharding

  device = jax.devices()[0]
  mesh = sharding.make_mesh({"data": 1}, devices=[device])
  rules = _rules()
  inherit_spec = spec(FLAGS.rank, FLAGS.heads)
  abstract = _sharded(param_shapes(_full_shape(), jnp.dtype(FLAGS.dtype)), mesh, rules)
  plan = _plan(abstract, inherit_spec, mesh, rules)
  teacher_params = _random_teacher(abstract)
  jax.block_until_ready(teacher_params)
  teacher = _bytes_per_device(jax.tree.leaves(teacher_params))
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
      "params_before": _count(teacher_params), "params_after": _count(out),
      "teacher_bytes": teacher, "peak_bytes_in_use": peak,
      "peak_bytes_after_teacher_init": after_init,
      "ratio": None if peak is None else peak / teacher,
      "planned_ratio": plan["ratio"], "planned_peak_stage": plan["peak_stage"],
      "seconds": seconds,
      "note": ("peak_bytes_in_use counts from process start; the teacher is initialised "
               "leaf by leaf so that its init peaks below the inherit"),
  }


def _planned_kernels(params, inherit_spec):
  """(path, kernel, rank, heads) of every kernel the spec factorises, sorted by path."""
  from flax import traverse_util

  out = []
  for path, leaf in sorted(traverse_util.flatten_dict(params, sep="/").items()):
    if not path.endswith("kernel"):
      continue
    stack = inherit_spec.stack_axes(path) or 0
    m, n = int(np.prod(leaf.shape[stack:-1])), int(leaf.shape[-1])
    plan = inherit_spec.plan(path, m, n, use_bias=False)
    if plan.factorize:
      out.append((path, leaf, stack, plan.rank, plan.heads))
  return out


@functools.partial(jax.jit, static_argnames=("rank", "heads"))
def _full_svd_layer(a, rank, heads):
  """One layer slice: full SVD, truncated; down ``U_r``, every head ``S_r V_r^T``."""
  u, s, vt = jnp.linalg.svd(a.astype(jnp.float32), full_matrices=False)
  up = s[:rank, None] * vt[:rank]
  return u[:, :rank].astype(a.dtype), jnp.broadcast_to(up, (heads, *up.shape)).astype(a.dtype)


def full_svd_inherit(params, inherit_spec, *, layers: int = 0, trace=None) -> dict:
  """The naive baseline: a Python loop of full SVDs, one per layer slice.

  Returns ``{"seconds", "seconds_estimate", "slices_run", "slices", "out"}``: the
  wall time of the slices run and its linear extrapolation to every slice (``layers``
  > 0 runs only the first ``layers`` slices of each stacked kernel). ``trace(shape)`` is
  called after every slice with the slice's matrix shape.
  """
  out, run, total = {}, 0, 0
  start = time.time()
  for path, kernel, stack, rank, heads in _planned_kernels(params, inherit_spec):
    mats = kernel.reshape(-1, int(np.prod(kernel.shape[stack:-1])), kernel.shape[-1])
    count = mats.shape[0] if not layers else min(layers, mats.shape[0])
    total += mats.shape[0]
    downs, ups = [], []
    for i in range(count):
      down, up = _full_svd_layer(mats[i], rank=rank, heads=heads)
      jax.block_until_ready(up)
      downs.append(down)
      ups.append(up)
      run += 1
      if trace is not None:
        trace(mats.shape[1:], rank, heads, kernel.dtype)
    out[path] = (jnp.stack(downs), jnp.stack(ups))
    del downs, ups
  jax.block_until_ready(out)
  seconds = time.time() - start
  return {"seconds": seconds, "seconds_estimate": seconds * total / run, "slices_run": run,
          "slices": total, "out": out}


def _svd_temp_bytes(shape, rank, heads, dtype, cache={}):
  key = (tuple(shape), rank, heads, str(dtype))
  if key not in cache:
    arg = jax.ShapeDtypeStruct(shape, dtype)
    compiled = _full_svd_layer.lower(arg, rank=rank, heads=heads).compile()
    cache[key] = int(compiled.memory_analysis().temp_size_in_bytes)
  return cache[key]


def run_baseline_cpu() -> dict:
  """Reduced stack on one CPU device: our kernel-by-kernel path vs per-layer full SVDs."""
  from inhernet_jax import sharding
  from benchmarks.memory_plan import stage_temp_bytes

  shape, rank, inherit_spec = _reduced()
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  abstract = _sharded(param_shapes(shape, jnp.dtype(FLAGS.dtype)), mesh, sharding.DEFAULT_RULES)
  if FLAGS.spectrum == "power_law":
    teacher_params = jax.tree.map(lambda a: jax.device_put(_power_law(a), a.sharding), abstract)
  else:
    teacher_params = _random_teacher(abstract)
  jax.block_until_ready(teacher_params)
  gc.collect()
  teacher = _bytes_per_device(jax.tree.leaves(teacher_params))
  other = _bytes_per_device(jax.live_arrays()) - teacher
  result = {"shape": dataclasses.asdict(shape), "rank": rank, "heads": FLAGS.heads,
            "dtype": FLAGS.dtype, "device": str(jax.devices()[0]), "teacher_bytes": teacher,
            "spectrum": FLAGS.spectrum}

  ours = functools.partial(_timed_inherit, teacher_params, inherit_spec, mesh=mesh)
  peaks = []
  _, cold = ours()
  out, _ = ours(lambda st: peaks.append(
      _bytes_per_device(jax.live_arrays()) - other + stage_temp_bytes(st)))
  our_factors = _factors(out, inherit_spec, teacher_params)
  del out
  gc.collect()
  _, warm = ours()
  gc.collect()
  result["inherit"] = {"seconds_cold": cold, "seconds_warm": warm, "peak_bytes": max(peaks),
                       "ratio": max(peaks) / teacher, "error_ratio_vs_full_svd": None}
  base_peaks = []
  full_svd_inherit(teacher_params, inherit_spec, layers=1)  # Compiles every shape once.
  gc.collect()
  base = full_svd_inherit(teacher_params, inherit_spec, layers=FLAGS.baseline_layers,
                          trace=lambda *a: base_peaks.append(
                              _bytes_per_device(jax.live_arrays()) - other + _svd_temp_bytes(*a)))
  result["inherit"]["error_ratio_vs_full_svd"] = _error_ratio(
      teacher_params, our_factors, base["out"], inherit_spec)
  result["full_svd"] = {"seconds_warm": base["seconds"], "seconds_estimate": base["seconds_estimate"],
                        "slices_run": base["slices_run"], "slices": base["slices"],
                        "peak_bytes": max(base_peaks), "ratio": max(base_peaks) / teacher}
  result["speedup"] = base["seconds_estimate"] / warm
  return result


def _power_law(leaf, seed=0):
  """A host array of ``leaf``'s shape whose matrices have singular values ``1/i``."""
  if len(leaf.shape) < 2:
    return np.ones(leaf.shape, leaf.dtype)
  rng = np.random.default_rng(seed)
  m, n = leaf.shape[-2:]
  k = min(m, n)
  mats = []
  for _ in range(int(np.prod(leaf.shape[:-2]))):
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    mats.append((u / np.arange(1, k + 1)) @ v.T)
  return np.stack(mats).reshape(leaf.shape).astype(leaf.dtype)


def _factors(out, inherit_spec, teacher_params) -> dict:
  """path -> (down, up) of an inherited params tree."""
  from flax import traverse_util

  flat = traverse_util.flatten_dict(out, sep="/")
  return {path: (flat[f"{path[:-len('kernel')]}down/kernel"], flat[f"{path[:-len('kernel')]}up/kernel"])
          for path, *_ in _planned_kernels(teacher_params, inherit_spec)}


def _error_ratio(teacher_params, ours: dict, full: dict, inherit_spec) -> float:
  """Largest ``||A - ours||_F / ||A - full SVD||_F`` over the slices both computed
  (1.0: our truncation is as good as the optimal one)."""
  worst = 0.0
  for path, kernel, stack, rank, heads in _planned_kernels(teacher_params, inherit_spec):
    m, n = int(np.prod(kernel.shape[stack:-1])), kernel.shape[-1]
    count = full[path][0].shape[0]
    a = np.asarray(kernel, np.float64).reshape(-1, m, n)[:count]

    def err(down, up):
      d = np.asarray(down, np.float64).reshape(-1, m, rank)[:count]
      u = np.asarray(up, np.float64).reshape(-1, heads, rank, n)[:count, 0]
      return np.linalg.norm(a - d @ u)

    worst = max(worst, err(*ours[path]) / max(err(*full[path]), 1e-30))
  return float(worst)


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


def run_device_full_svd() -> dict:
  """The full stack on one accelerator, inherited by per-layer full SVDs."""
  device = jax.devices()[0]
  from inhernet_jax import sharding

  mesh = sharding.make_mesh({"data": 1}, devices=[device])
  inherit_spec = spec(FLAGS.rank, FLAGS.heads)
  abstract = _sharded(param_shapes(_full_shape(), jnp.dtype(FLAGS.dtype)), mesh, _rules())
  teacher_params = _random_teacher(abstract)
  jax.block_until_ready(teacher_params)
  teacher = _bytes_per_device(jax.tree.leaves(teacher_params))
  base = full_svd_inherit(teacher_params, inherit_spec, layers=FLAGS.baseline_layers)
  peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
  return {"device": str(device), "dtype": FLAGS.dtype, "rank": FLAGS.rank, "heads": FLAGS.heads,
          "teacher_bytes": teacher, "peak_bytes_in_use": peak,
          "ratio": None if peak is None else peak / teacher,
          "seconds": base["seconds"], "seconds_estimate": base["seconds_estimate"],
          "slices_run": base["slices_run"], "slices": base["slices"],
          "note": "seconds include compiling each matrix shape once"}


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


def _print(result: dict) -> None:
  if "plan" in result:
    p = result["plan"]
    print(f"plan {p['shape']} ({p['dtype']}, rank {p['rank']}, H={p['heads']}, mesh {result['mesh']}): "
          f"params {p['params_before']:,} -> {p['params_after']:,}")
    print(f"  teacher {_gb(p['teacher_bytes_per_device'])}/device, planned peak "
          f"{_gb(p['peak_bytes_per_device'])}/device: {p['ratio']:.3f}x "
          f"(at {p['peak_stage']['name']} {p['peak_stage']['path']}; "
          f"{p['programs_compiled']} programs compiled in {p['plan_seconds']:.0f}s)")
  if "real" in result:
    r = result["real"]
    print(f"reduced real run (width {r['shape']['width']}, {r['shape']['layers']} layers, rank "
          f"{r['rank']}): params {r['params_before']:,} -> {r['params_after']:,}")
    print(f"  teacher {_gb(r['teacher_bytes_per_device'])}/device, measured peak "
          f"{_gb(r['peak_bytes_per_device'])}/device: {r['ratio']:.3f}x (planned "
          f"{r['planned_ratio']:.3f}x; at {r['peak_stage']['name']} {r['peak_stage']['path']}); "
          f"{r['seconds_cold']:.1f}s cold, {r['seconds_warm']:.1f}s warm")
  if "device" in result and "params_before" in result["device"]:
    d = result["device"]
    ratio = "n/a" if d["ratio"] is None else f"{d['ratio']:.3f}x"
    print(f"{d['device']} ({d['dtype']}): params {d['params_before']:,} -> {d['params_after']:,}; "
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
    result["device"] = run_device_full_svd()
  elif device_mode:
    result["device"] = run_device()
  else:
    from inhernet_jax import sharding

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
      result["baseline"] = run_baseline_cpu()
  with open(FLAGS.out, "w") as f:  # Before printing: a long run's figures are never lost.
    json.dump(result, f, indent=2)
  _print(result)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
