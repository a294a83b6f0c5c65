r"""Benchmarks of the core engine: `inherit` speed and accuracy, gated-layer overhead.

Runs, in one invocation on this machine, the parts named by ``--parts`` (default all
three), prints Markdown tables and writes every figure to JSON (``--out``):

1. ``resnet50``: `inherit` of ResNet-50-shaped random params (the 53 torchvision
   ResNet-50 conv kernels and the 2048x1000 classifier, 25.5M parameters) at ``--rank``:
   cold (a fresh process, compile included; once with an empty persistent compilation
   cache, once with the cache an earlier process filled) and warm (same process, second
   call); against the public demo's method, a per-layer ``torch.linalg.svd`` loop over the
   same kernels, and a NumPy full-SVD loop. Accuracy: the largest relative error of the
   top-r singular values that the produced heads carry, against NumPy's exact SVD.
   Spectra: ``gaussian`` (He-normal: flat) and ``decaying`` (s_i ~ s_1 / i).
2. ``llama``: a reduced LLaMA-shaped bf16 teacher (``--llama_shape``: 2 scan-stacked
   layers, width 1024, SwiGLU MLP 2752, vocabulary 4000; see `benchmarks.llama`) at
   rank 128, H = 2: ours at the ``default``, ``fast`` (``power_iters=2``) and ``exact``
   settings (cold: the first call in a fresh process; warm: the best later call in that
   process), PiSSA's fast SVD (``torch.svd_lowrank(W.float(), q=r, niter=4)`` per
   matrix) and a full ``torch.linalg.svd`` loop over the same matrices; each method's
   truncation error over the optimal (Eckart-Young) error, max and mean over matrices;
   times as ratios to PiSSA's in the same run. Spectra: ``gaussian`` (N(0, 1/fan_in))
   and ``decaying`` (row i of each matrix scaled by (i+1)^-0.5). A setting the engine's
   `InherSpec` does not know is skipped with the reason.
3. ``layers``: `InherConv` forward+backward for a ResNet-sized layer at H = 1, 2, 4, 8.

``--device`` instead runs the full 32-layer LLaMA-2-7B shape (width 4096, MLP 11008,
vocabulary 32000; ``--device_layers`` etc. shrink it) at rank 512, H = 2, bf16, on one
accelerator: ours cold (with its JAX compile time apart) and warm against PiSSA's fast
SVD in torch on the same device and matrices (DLPack), errors over optimal on the first
layer's matrices. Without an accelerator it runs on the CPU and says so.

torch runs with as many threads as XLA (``--torch_threads``, default: the CPUs this
process may use); the JSON records ``torch.get_num_threads()``.

Example:
  ```bash
  python -m benchmarks.engine --out=benchmark.json
  python -m benchmarks.engine --parts=llama --out=benchmark_llama.json
  python -m benchmarks.engine --device --out=benchmark_gpu.json
  python -m benchmarks.engine --device --device_layers=4 --out=b.json  # a quicker check
  ```
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

from benchmarks.common import markdown_table

FLAGS = flags.FLAGS
flags.DEFINE_integer("rank", 32, "Rank of the inherited layers.")
flags.DEFINE_integer("repeats", 3, "Repeats of each warm timing (the minimum is kept).")
flags.DEFINE_list("spectra", ["gaussian", "decaying"], "Weight spectra to benchmark.")
flags.DEFINE_string("out", "benchmark.json", "Where to write the JSON figures.")
flags.DEFINE_list("parts", ["resnet50", "llama", "layers"], "Parts to run (see the docstring).")
flags.DEFINE_bool("layers", True, "Deprecated: --nolayers drops the layers part.")
flags.DEFINE_integer("torch_threads", 0, "torch threads (0: the CPUs this process may use).")
flags.DEFINE_integer("seed", 0, "Seed of the LLaMA-shaped teachers.")
flags.DEFINE_integer("heads", 2, "Expert up-projections H of the LLaMA-shaped parts.")
flags.DEFINE_integer("llama_rank", 128, "Rank of the reduced LLaMA-shaped part.")
flags.DEFINE_list("llama_shape", ["2", "1024", "2752", "4000"],
                  "layers,width,mlp,vocab of the reduced LLaMA-shaped teacher.")
flags.DEFINE_list("llama_settings", ["default", "fast", "exact"], "Our settings to time.")
flags.DEFINE_integer("llama_repeats", 2, "Warm repeats of ours and PiSSA (the best is kept; "
                     "0: ours cold only, PiSSA once).")
flags.DEFINE_bool("llama_full_svd", True, "Also time a full torch.linalg.svd loop (once).")
flags.DEFINE_bool("device", False, "Run the full LLaMA-2-7B-shaped part on one accelerator "
                  "(the CPU when there is none) instead of --parts.")
flags.DEFINE_integer("device_layers", 32, "Layers of the --device teacher.")
flags.DEFINE_integer("device_width", 4096, "Width of the --device teacher.")
flags.DEFINE_integer("device_mlp", 11008, "MLP width of the --device teacher.")
flags.DEFINE_integer("device_vocab", 32000, "Vocabulary of the --device teacher.")
flags.DEFINE_integer("device_rank", 512, "Rank of the --device part.")
flags.DEFINE_list("device_spectra", ["gaussian", "decaying"], "Spectra of the --device part.")
flags.DEFINE_list("device_settings", ["default"], "Our settings in the --device part.")
flags.DEFINE_integer("device_repeats", 1, "Warm repeats in the --device part.")
flags.DEFINE_integer("device_error_layers", 1, "--device errors: matrices of these first layers.")
flags.DEFINE_bool("device_mesh", False, "--device: pass inherit a one-device mesh.")
flags.DEFINE_string("child", None, "Internal: run one cold measurement and print JSON.")
flags.DEFINE_string("child_llama", None, "Internal: spectrum:setting of one LLaMA child.")
flags.DEFINE_string("cache_dir", None, "Internal: persistent compilation cache of a child.")

PARTS = ("resnet50", "llama", "layers")


def resnet50_kernels(spectrum: str, seed: int = 0) -> dict:
  """Flax-layout params with torchvision ResNet-50's conv and classifier shapes."""
  import numpy as np

  rng = np.random.default_rng(seed)
  params = {}

  def add(name, shape, bias=False):
    fan_in = int(np.prod(shape[:-1]))
    w = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    if spectrum == "decaying":
      u, s, vt = np.linalg.svd(w.reshape(fan_in, shape[-1]), full_matrices=False)
      s = s[0] / np.arange(1, len(s) + 1)
      w = ((u * s) @ vt).reshape(shape)
    params[name] = {"kernel": w.astype(np.float32)}
    if bias:
      params[name]["bias"] = np.zeros(shape[-1], np.float32)

  add("conv1", (7, 7, 3, 64))
  cin = 64
  for stage, (mid, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
    for b in range(blocks):
      pre = f"layer{stage + 1}_{b}"
      add(f"{pre}/conv1", (1, 1, cin, mid))
      add(f"{pre}/conv2", (3, 3, mid, mid))
      add(f"{pre}/conv3", (1, 1, mid, 4 * mid))
      if b == 0:
        add(f"{pre}/downsample", (1, 1, cin, 4 * mid))
      cin = 4 * mid
  add("fc", (2048, 1000), bias=True)
  nested = {}
  for name, leaves in params.items():
    node = nested
    for part in name.split("/")[:-1]:
      node = node.setdefault(part, {})
    node[name.split("/")[-1]] = leaves
  return nested


def _kernels(params):
  from inhernet_jax.common import utils

  return [leaf for name, leaf in utils.flatten_with_names(params) if name.split("/")[-1] == "kernel"]


def _accuracy(params, out, rank):
  """Largest relative error of the heads' singular values vs NumPy's exact SVD."""
  import numpy as np

  from inhernet_jax.common import utils

  worst, checked = 0.0, 0
  flat_in = {n[:-len("/kernel")]: l for n, l in utils.flatten_with_names(params) if n.endswith("/kernel")}
  flat_out = {n[:-len("/up/kernel")]: l for n, l in utils.flatten_with_names(out) if n.endswith("/up/kernel")}
  for name, up in flat_out.items():
    w = np.asarray(flat_in[name], np.float64)
    exact = np.linalg.svd(w.reshape(-1, w.shape[-1]), compute_uv=False)[:rank]
    # Each head is S_r V_r^T with orthonormal V_r: its row norms are the singular values.
    got = np.linalg.norm(np.asarray(up[0], np.float64), axis=-1)
    err = np.abs(got - exact) / exact
    if not np.all(np.isfinite(err)):
      raise FloatingPointError(f"{name}: non-finite singular values {got} vs {exact}")
    worst = max(worst, float(err.max()))
    checked += 1
  return worst, checked


def _time(fn, repeats):
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def _cold_child(spectrum: str) -> None:
  """Runs in a fresh process: times the first `inherit` call, compile included."""
  t0 = time.perf_counter()
  import jax

  if FLAGS.cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  import inhernet_jax

  params = jax.tree.map(jax.numpy.asarray, resnet50_kernels(spectrum))
  jax.block_until_ready(params)
  t1 = time.perf_counter()
  jax.block_until_ready(inhernet_jax.inherit(params, FLAGS.rank))
  t2 = time.perf_counter()
  print(json.dumps({"import_and_params_s": t1 - t0, "cold_s": t2 - t1}))


def _run_child(spectrum: str, cache_dir: str | None) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.engine", f"--child={spectrum}", f"--rank={FLAGS.rank}"]
  if cache_dir:
    cmd.append(f"--cache_dir={cache_dir}")
  res = subprocess.run(cmd, capture_output=True, text=True, check=True)
  return json.loads(res.stdout.strip().splitlines()[-1])


def _torch():
  """torch with as many threads as XLA uses (or --torch_threads)."""
  import torch

  torch.set_num_threads(FLAGS.torch_threads or len(os.sched_getaffinity(0)))
  return torch


def bench_inherit(spectrum: str) -> dict:
  import jax
  import numpy as np

  torch = _torch()

  import inhernet_jax

  params_np = resnet50_kernels(spectrum)
  params = jax.tree.map(jax.numpy.asarray, params_np)
  kernels = _kernels(params_np)
  n_params = sum(int(np.prod(k.shape)) for k in _kernels(params_np)) + 1000
  with tempfile.TemporaryDirectory() as cache:
    cold_empty = _run_child(spectrum, cache)
    cold_cached = _run_child(spectrum, cache)
  out = inhernet_jax.inherit(params, FLAGS.rank)  # Compile in this process.
  jax.block_until_ready(out)
  warm = _time(lambda: jax.block_until_ready(inhernet_jax.inherit(params, FLAGS.rank)), FLAGS.repeats)
  err, checked = _accuracy(params_np, out, FLAGS.rank)

  # The public demo's method: PyTorch (out, in*kh*kw) weights, one full SVD per layer.
  torch_w = [torch.from_numpy(np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T)) for k in kernels]
  torch_s = _time(lambda: [torch.linalg.svd(w, full_matrices=False) for w in torch_w], FLAGS.repeats)
  mats = [k.reshape(-1, k.shape[-1]) for k in kernels]
  numpy_s = _time(lambda: [np.linalg.svd(a, full_matrices=False) for a in mats], 1)
  return {
      "spectrum": spectrum,
      "kernels": len(kernels),
      "params": n_params,
      "rank": FLAGS.rank,
      "factorised": checked,
      "cold_empty_cache_s": cold_empty["cold_s"],
      "cold_filled_cache_s": cold_cached["cold_s"],
      "warm_s": warm,
      "torch_svd_loop_s": torch_s,
      "numpy_svd_loop_s": numpy_s,
      "cold_empty_cache_vs_torch": cold_empty["cold_s"] / torch_s,
      "cold_filled_cache_vs_torch": cold_cached["cold_s"] / torch_s,
      "warm_vs_torch": warm / torch_s,
      "max_rel_error_top_r_singular_values": err,
      "torch_threads": torch.get_num_threads(),
  }


def bench_layers() -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from inhernet_jax import InherConv, InherSpec

  # A ResNet stage-3 3x3 conv (256 -> 256 channels at 14x14), batch 32, rank 64.
  x = jax.random.normal(jax.random.key(0), (32, 14, 14, 256))
  times = {}
  for heads in (None, 1, 2, 4, 8):
    spec = None if heads is None else InherSpec(rank=64, heads=heads)
    layer = InherConv(256, (3, 3), spec=spec)
    params = layer.init(jax.random.key(1), x)["params"]

    @jax.jit
    def step(params, x):
      loss = lambda p, x: jnp.mean(jnp.square(layer.apply({"params": p}, x)))
      return jax.grad(loss, argnums=(0, 1))(params, x)

    jax.block_until_ready(step(params, x))
    per = []
    for _ in range(5):
      t = time.perf_counter()
      for _ in range(5):
        jax.block_until_ready(step(params, x))
      per.append((time.perf_counter() - t) / 5)
    times["teacher" if heads is None else f"H={heads}"] = float(np.median(per))
  base = times["H=1"]
  return {
      "layer": "3x3 conv 256->256, 14x14, batch 32, rank 64, forward+backward",
      "seconds": times,
      "vs_H1": {k: v / base for k, v in times.items()},
  }


def _llama_shape():
  from benchmarks import llama as bl

  return bl.Shape(*(int(x) for x in FLAGS.llama_shape))


def _llama_child(arg: str) -> None:
  """Runs in a fresh process: ours at one setting, first call (cold) then warm calls."""
  t0 = time.perf_counter()
  import jax
  import jax.numpy as jnp
  import numpy as np

  import inhernet_jax
  from benchmarks import llama as bl

  spectrum, setting = arg.split(":")
  spec = bl.spec(setting, FLAGS.llama_rank, FLAGS.heads)
  teacher = bl.host_teacher(_llama_shape(), spectrum, FLAGS.seed)
  params = jax.block_until_ready(bl.nest(teacher, lambda w: jnp.asarray(w, jnp.bfloat16)))
  jax.monitoring.register_event_duration_secs_listener(bl._on_event)
  t1 = time.perf_counter()
  out = jax.block_until_ready(inhernet_jax.inherit(params, spec))
  t2 = time.perf_counter()
  compile_s = sum(bl._compile_seconds)
  warm = float("inf")
  for _ in range(FLAGS.llama_repeats):
    del out
    t = time.perf_counter()
    out = jax.block_until_ready(inhernet_jax.inherit(params, spec))
    warm = min(warm, time.perf_counter() - t)
  warm_compile_s = sum(bl._compile_seconds) - compile_s  # Before the slicing below compiles.
  mats = bl.slices(teacher)
  factors = bl.inherited_factors(out, [name for name, _ in mats])
  errors = [bl.error(w, np.asarray(d), np.asarray(u)) for (_, w), (d, u) in zip(mats, factors)]
  print(json.dumps({"import_and_params_s": t1 - t0, "cold_s": t2 - t1, "compile_s": compile_s,
                    "warm_compile_s": warm_compile_s,
                    "warm_s": warm if FLAGS.llama_repeats else None, "errors": errors}))


def _run_llama_child(spectrum: str, setting: str) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.engine", f"--child_llama={spectrum}:{setting}",
         f"--llama_rank={FLAGS.llama_rank}", f"--heads={FLAGS.heads}", f"--seed={FLAGS.seed}",
         f"--llama_shape={','.join(FLAGS.llama_shape)}", f"--llama_repeats={FLAGS.llama_repeats}"]
  res = subprocess.run(cmd, capture_output=True, text=True)
  if res.returncode:
    raise RuntimeError(f"llama child {spectrum}:{setting} failed ({res.returncode}):\n"
                       f"{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def bench_llama(on_row=None) -> dict:
  """The reduced LLaMA shape: ours (each setting) vs PiSSA vs a full SVD loop.

  ``on_row`` is called with the rows so far after each row (a long run on a busy
  machine keeps what it measured)."""
  from benchmarks import llama as bl

  torch = _torch()
  shape, rank = _llama_shape(), FLAGS.llama_rank
  rows, matrices = [], 0

  def add(row):
    rows.append(row)
    if on_row:
      on_row(bl.with_ratios(rows))

  for spectrum in FLAGS.spectra:
    teacher = bl.host_teacher(shape, spectrum, FLAGS.seed)
    mats = bl.slices(teacher)
    matrices = len(mats)
    optimal = bl.optimal_errors(mats, rank)
    for setting in FLAGS.llama_settings:
      row = {"spectrum": spectrum, "method": f"ours {setting}"}
      try:
        bl.spec(setting, rank, FLAGS.heads)
      except TypeError as e:  # Today's engine has no power_iters: say so, go on.
        add({**row, "skipped": f"InherSpec has no {bl.SETTING_KWARGS[setting]} ({e})"})
        print(f"llama {spectrum} {row['method']}: skipped ({e})", flush=True)
        continue
      child = _run_llama_child(spectrum, setting)
      row.update({k: child[k] for k in ("cold_s", "warm_s", "compile_s", "warm_compile_s",
                                        "import_and_params_s")})
      add({**row, **bl.summary(child["errors"], optimal)})
      print(f"llama {spectrum} {row['method']}: cold {row['cold_s']:.2f}s, warm "
            f"{bl._s(row['warm_s'])}", flush=True)
    weights = [bl.torch_weight(w) for _, w in mats]
    pissa_s, factors = bl.time_pissa(weights, rank, max(FLAGS.llama_repeats, 1))
    add({"spectrum": spectrum, "method": f"PiSSA svd_lowrank(q=r, niter={bl.PISSA_NITER})",
         "cold_s": None, "warm_s": pissa_s,
         **bl.summary(bl.torch_errors(mats, [factors[i] for i in range(len(mats))]), optimal)})
    print(f"llama {spectrum} PiSSA: {pissa_s:.2f}s", flush=True)
    if FLAGS.llama_full_svd:
      full_s, factors = bl.time_full_svd(weights, rank, 1)
      add({"spectrum": spectrum, "method": "torch.linalg.svd loop", "cold_s": None,
           "warm_s": full_s, **bl.summary(bl.torch_errors(mats, factors), optimal)})
  bl.with_ratios(rows)
  return {"shape": dataclasses.asdict(shape), "rank": rank, "heads": FLAGS.heads,
          "dtype": "bfloat16", "matrices": matrices, "repeats": FLAGS.llama_repeats,
          "torch_threads": torch.get_num_threads(), "rows": rows, "table": bl.markdown(rows)}


def resnet_markdown(rows: list[dict]) -> str:
  head = ["weights", "torch loop", "NumPy loop", "cold", "cold, filled cache", "warm",
          "max rel. error"]
  return markdown_table(head, [[
      r["spectrum"], f"{r['torch_svd_loop_s']:.2f} s", f"{r['numpy_svd_loop_s']:.2f} s",
      f"{r['cold_empty_cache_s']:.2f} s ({r['cold_empty_cache_vs_torch']:.2f}x)",
      f"{r['cold_filled_cache_s']:.2f} s ({r['cold_filled_cache_vs_torch']:.2f}x)",
      f"{r['warm_s']:.2f} s ({r['warm_vs_torch']:.2f}x)",
      f"{r['max_rel_error_top_r_singular_values']:.1e}"] for r in rows], left=1)


def _write(results: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    f.write(json.dumps(results, indent=2) + "\n")


def run_device() -> dict:
  from benchmarks import llama as bl

  # JAX's preallocation would leave torch (PiSSA) a quarter of the accelerator's memory.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
  shape = bl.Shape(FLAGS.device_layers, FLAGS.device_width, FLAGS.device_mlp, FLAGS.device_vocab)
  _torch()
  result = bl.run_device(
      shape, FLAGS.device_rank, FLAGS.heads, FLAGS.device_spectra, FLAGS.device_settings,
      repeats=FLAGS.device_repeats, error_layers=FLAGS.device_error_layers,
      one_device_mesh=FLAGS.device_mesh, on_row=lambda r: _write({"device": r}))
  result["table"] = bl.markdown(result["rows"], compile_column=True)
  return result


def main(argv):
  del argv
  if FLAGS.child:
    _cold_child(FLAGS.child)
    return
  if FLAGS.child_llama:
    _llama_child(FLAGS.child_llama)
    return
  if FLAGS.device:
    result = run_device()
    _write({"device": result})
    d = result
    print(f"\n{d['shape']}, rank {d['rank']}, H={d['heads']}, bf16 on {d['device_kind']} "
          f"({d['platform']}); errors on {len(d['error_matrices'])} of {d['matrices']} matrices\n")
    print(d["table"])
    print(f"wrote {FLAGS.out}")
    return
  parts = [p.strip() for p in FLAGS.parts]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise app.UsageError(f"--parts: unknown {unknown}, expected some of {list(PARTS)}")
  if not FLAGS.layers and "layers" in parts:
    parts.remove("layers")
  results = {"machine": f"{os.cpu_count()} CPU cores", "parts": parts}
  tables = []
  if "resnet50" in parts:
    results["inherit"] = []
    for spectrum in FLAGS.spectra:
      row = bench_inherit(spectrum)
      logging.info("inherit %s: %s", spectrum, row)
      results["inherit"].append(row)
      _write(results)
    tables.append(f"ResNet-50 shapes, rank {FLAGS.rank}, H=1:\n\n{resnet_markdown(results['inherit'])}")
  if "llama" in parts:
    results["llama"] = r = bench_llama(lambda rows: _write({**results, "llama_rows_so_far": rows}))
    _write(results)
    tables.append(f"LLaMA shape {r['shape']}, {r['matrices']} matrices, rank {r['rank']}, "
                  f"H={r['heads']}, bf16, torch threads {r['torch_threads']}:\n\n{r['table']}")
  if "layers" in parts:
    results["layers"] = bench_layers()
    tables.append("InherConv forward+backward: " + json.dumps(results["layers"]["seconds"]))
  _write(results)
  print("\n\n".join(tables))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
