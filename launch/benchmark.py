r"""Benchmarks of the core engine: `inherit` speed and accuracy, gated-layer overhead.

Runs, in one invocation on this machine, and prints + writes JSON:

1. `inherit` of ResNet-50-shaped random params (the 53 torchvision ResNet-50 conv kernels
   and the 2048x1000 classifier, 25.5M parameters) at ``--rank``: cold (a fresh process,
   compile included; once with an empty persistent compilation cache, once with the cache
   an earlier process filled) and warm (same process, second call); against the public
   demo's method, a per-layer ``torch.linalg.svd`` loop over the same kernels, and a NumPy
   full-SVD loop. Accuracy: the largest relative error of the top-r singular values that
   the produced heads carry, against NumPy's exact SVD.
2. `InherConv` forward+backward for a ResNet-sized layer at H = 1, 2, 4, 8.

Two weight spectra: ``gaussian`` (He-normal init: flat spectra, the hardest case for a
randomized SVD) and ``decaying`` (the same singular vectors with s_i ~ s_1 / i, like
trained weights).

Run::

  python -m launch.benchmark --out=benchmark.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_integer("rank", 32, "Rank of the inherited layers.")
flags.DEFINE_integer("repeats", 3, "Repeats of each warm timing (the minimum is kept).")
flags.DEFINE_list("spectra", ["gaussian", "decaying"], "Weight spectra to benchmark.")
flags.DEFINE_string("out", "benchmark.json", "Where to write the JSON figures.")
flags.DEFINE_bool("layers", True, "Also benchmark InherConv at H = 1, 2, 4, 8.")
flags.DEFINE_string("child", None, "Internal: run one cold measurement and print JSON.")
flags.DEFINE_string("cache_dir", None, "Internal: persistent compilation cache of a child.")


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
  import jax

  return [
      leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
      if path[-1].key == "kernel"
  ]


def _accuracy(params, out, rank):
  """Largest relative error of the heads' singular values vs NumPy's exact SVD."""
  import jax
  import numpy as np

  worst, checked = 0.0, 0
  flat_in = {jax.tree_util.keystr(p[:-1]): l for p, l in jax.tree_util.tree_flatten_with_path(params)[0] if p[-1].key == "kernel"}
  flat_out = {jax.tree_util.keystr(p[:-2]): l for p, l in jax.tree_util.tree_flatten_with_path(out)[0] if p[-2].key == "up" and p[-1].key == "kernel"}
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
  cmd = [sys.executable, "-m", "launch.benchmark", f"--child={spectrum}", f"--rank={FLAGS.rank}"]
  if cache_dir:
    cmd.append(f"--cache_dir={cache_dir}")
  res = subprocess.run(cmd, capture_output=True, text=True, check=True)
  return json.loads(res.stdout.strip().splitlines()[-1])


def bench_inherit(spectrum: str) -> dict:
  import jax
  import numpy as np
  import torch

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


def main(argv):
  del argv
  if FLAGS.child:
    _cold_child(FLAGS.child)
    return
  results = {"machine": f"{os.cpu_count()} CPU cores", "inherit": []}
  for spectrum in FLAGS.spectra:
    row = bench_inherit(spectrum)
    logging.info("inherit %s: %s", spectrum, row)
    results["inherit"].append(row)
  if FLAGS.layers:
    results["layers"] = bench_layers()
  text = json.dumps(results, indent=2)
  print(text)
  with open(FLAGS.out, "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
