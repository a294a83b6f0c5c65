"""Accuracy sweep of the default SVD setting: error over the optimal (Eckart-Young) one.

For every shape, spectrum and teacher dtype, every rank the ``method="auto"`` rule sends
to the randomized method (fractions of ``min(m, n)`` up to the largest it routes there)
is truncated as `inherit` does on the host (`svd.randomized_svd` with NumPy, the
a-posteriori precision check included), and the Frobenius error of the factors (in
float64, before they are cast to the parameter dtype) is divided by the optimal one of
the matrix the method saw (the teacher's dtype rounding included). Spectra: a Gaussian
matrix (flat) and ``U diag(i^-p) V^T`` with random orthogonal ``U``, ``V``.

Example:
  ```python
  python -m benchmarks.accuracy --out=accuracy.json   # also writes accuracy.md
  python -m benchmarks.accuracy --shapes=512x512 --powers=0,3 --dtypes=float32
  python -m benchmarks.accuracy --data_aware   # the damping table (svd.whitened_svd)
  python -m benchmarks.accuracy --exact --fractions=0.26,0.3,0.4,0.5,0.75 --out=exact.json
  ```

``--exact``: the ranks ``auto`` sends to the exact SVD instead (fractions above 1/4 of
``min(m, n)``: ``--fractions=0.26,0.3,0.4,0.5,0.75``), truncated on the host (NumPy) and
jitted (`svd.truncated_svd` under `jax.jit`: on the CPU NumPy's LAPACK in float64 through
a callback, `inhernet_jax.decomposition.lapack`), each over the optimal error, with the
floor float32 factors allow: the float64 SVD's factors rounded to float32 (on steep
spectra at high ranks the optimal error is a few float32 ulps of ``||A||``, and no
float32 factorisation reaches it).

``--data_aware``: data-aware truncation instead (`svd.whitened_svd`), the true output
error ``||X (A - A_r)||`` over its float64 optimum, for damping 0 and the default, on
the host (NumPy) and jitted (float32 Gram), for inputs ``X`` of several condition numbers
and a rank-deficient one (fewer rows than features).
"""

from __future__ import annotations

import json
import sys
import time

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import app, flags

from inhernet_jax.decomposition import svd

flags.DEFINE_string("shapes", "512x512,2304x256,4096x256,4096x1024", "m x n matrices")
flags.DEFINE_string("powers", "0,0.1,0.25,0.5,1,2,3", "spectra s_i = i^-p (0: Gaussian)")
flags.DEFINE_string("dtypes", "float32,bfloat16", "teacher dtypes")
flags.DEFINE_string("fractions", "0.015625,0.03125,0.0625,0.09375,0.125,0.15625,0.1875,0.21875,0.25",
                    "ranks as fractions of min(m, n); those `auto` sends to the exact SVD "
                    "are left out")
flags.DEFINE_string("out", "accuracy.json", "JSON output; Markdown next to it (.md)")
flags.DEFINE_bool("data_aware", False, "Print the data-aware (damping) table instead.")
flags.DEFINE_bool("exact", False, "Sweep the ranks `auto` sends to the exact SVD, host and "
                  "jitted, with the float32 floor (set --fractions above 0.25).")
FLAGS = flags.FLAGS


def matrix(m: int, n: int, power: float, seed: int = 0) -> np.ndarray:
  """Gaussian (``power == 0``) or ``U diag(i^-power) V^T``, float64."""
  rng = np.random.default_rng(seed)
  if power == 0:
    return rng.normal(size=(m, n))
  k = min(m, n)
  u = np.linalg.qr(rng.normal(size=(m, k)))[0]
  v = np.linalg.qr(rng.normal(size=(n, k)))[0]
  return (u * np.arange(1, k + 1.0) ** -power) @ v.T


def ratio(a: np.ndarray, rank: int, values: np.ndarray) -> float:
  """Error of the default host truncation of ``a`` over the optimal one."""
  m, n = a.shape
  start = svd.start_matrix(None, (1, min(m, n), svd.width(m, n, rank)))
  u, s, v = (np.asarray(x, np.float64)[0] for x in svd.randomized_svd(a[None], rank, start, xp=np))
  err = np.linalg.norm(a.astype(np.float64) - (u * s) @ v.T)
  return float(err / np.sqrt(np.sum(values[rank:] ** 2)))


def _cases(shapes, powers, dtypes, fractions, method):
  """``(m, n, power, dtype, base, teacher, ranks)`` of a sweep: the ranks of ``fractions``
  that ``auto`` sends to ``method``, every spectrum, every teacher dtype."""
  for m, n in shapes:
    ranks = sorted({r for f in fractions if (r := max(1, int(f * min(m, n))))
                    and svd.resolve_method(m, n, r, "auto") == method})
    for power in powers:
      base = matrix(m, n, power)
      for dtype in dtypes:
        teacher = base.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
        yield m, n, power, dtype, base, teacher, ranks


def sweep(shapes, powers, dtypes, fractions):
  rows = []
  for m, n, power, dtype, base, teacher, ranks in _cases(shapes, powers, dtypes, fractions,
                                                          "randomized"):
    a = teacher.astype(np.float32)  # What the method computes on.
    # The teacher's own rounding (bf16: ~2e-3, a small random perturbation that moves
    # a flat spectrum's ratios only in the 7th digit, a steep one's tail more).
    rounding = float(np.linalg.norm(a - base) / np.linalg.norm(base))
    values = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    t = time.perf_counter()
    got = {r: ratio(a, r, values) for r in ranks}
    rows.append(dict(shape=f"{m}x{n}", power=power, dtype=dtype, rounding=rounding, ratios=got,
                     worst=max(got.values()), seconds=time.perf_counter() - t))
    print(json.dumps(rows[-1]), flush=True)
  return rows


def _error(a, u, s, v, values, rank) -> float:
  u, s, v = (np.asarray(x, np.float64) for x in (u, s, v))
  return float(np.linalg.norm(a.astype(np.float64) - (u * s) @ v.T)
               / np.sqrt(np.sum(values[rank:] ** 2)))


def exact_sweep(shapes, powers, dtypes, fractions):
  """The ranks ``auto`` sends to the exact SVD: host, jitted and the float32 floor."""
  rows = []
  for m, n, power, dtype, _, teacher, ranks in _cases(shapes, powers, dtypes, fractions,
                                                       "exact"):
    a = teacher.astype(np.float32)
    u64, values, vt64 = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    t = time.perf_counter()
    row = dict(shape=f"{m}x{n}", power=power, dtype=dtype, host={}, jitted={}, floor={})
    for r in ranks:
      host = [x[0] for x in svd.exact_svd(a[None], r, xp=np)]
      jitted = jax.jit(functools.partial(svd.truncated_svd, rank=r))(jnp.asarray(teacher))
      row["host"][r] = _error(a, *host, values, r)
      row["jitted"][r] = _error(a, *jitted, values, r)
      row["floor"][r] = _error(a, *(x.astype(np.float32) for x in (
          u64[:, :r], values[:r], vt64[:r].T)), values, r)
    row.update(worst_jitted=max(row["jitted"].values()), seconds=time.perf_counter() - t)
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def exact_markdown(rows) -> str:
  lines = ["| shape | spectrum | teacher | ranks: jitted / host / float32 floor | worst jitted |",
           "|---|---|---|---|---:|"]
  for r in rows:
    spectrum = "Gaussian" if r["power"] == 0 else f"i^-{r['power']:g}"
    each = ", ".join(f"{k}: {r['jitted'][k]:.4f} / {r['host'][k]:.4f} / {r['floor'][k]:.4f}"
                     for k in r["jitted"])
    lines.append(f"| {r['shape']} | {spectrum} | {r['dtype']} | {each} | {r['worst_jitted']:.4f} |")
  return "\n".join(lines) + "\n"


def markdown(rows) -> str:
  lines = ["| shape | spectrum | teacher (rel. rounding) | ranks (error / optimal) | worst |",
           "|---|---|---|---|---:|"]
  for r in rows:
    spectrum = "Gaussian" if r["power"] == 0 else f"i^-{r['power']:g}"
    each = ", ".join(f"{k}: {v:.4f}" for k, v in r["ratios"].items())
    lines.append(f"| {r['shape']} | {spectrum} | {r['dtype']} ({r['rounding']:.0e}) | {each} | "
                 f"{r['worst']:.4f} |")
  return "\n".join(lines) + "\n"


def data_aware(m: int = 64, n: int = 48, rank: int = 24, seeds: int = 3) -> str:
  """The damping table: worst over ``seeds`` of the output error over its optimum."""
  cases = [(40, 0), (400, 0), (400, 3), (400, 5), (400, 7)]  # (rows, log10 cond(X)).
  settings = [(d, how) for d in (svd.DAMPING, 0.0) for how in ("host", "jitted")]
  lines = ["| X | " + " | ".join(f"damping {d:g}, {how}" for d, how in settings) + " |",
           "|---|" + "---:|" * len(settings)]
  for rows, log_cond in cases:
    worst = [0.0] * len(settings)
    for seed in range(seeds):
      rng = np.random.default_rng(seed)
      basis = np.linalg.qr(rng.normal(size=(m, m)))[0]
      x = rng.normal(size=(rows, m)) @ basis * np.logspace(0, -log_cond, m)
      a = rng.normal(size=(m, n))
      optimum = np.sqrt(np.sum(np.linalg.svd(x @ a, compute_uv=False)[rank:] ** 2))
      for i, (damping, how) in enumerate(settings):
        if how == "host":
          out = svd.whitened_svd(a.astype(np.float32), x.T @ x / rows, rank, damping, xp=np)
        else:
          fn = jax.jit(functools.partial(svd.whitened_svd, rank=rank, damping=damping))
          out = fn(jnp.asarray(a, jnp.float32), jnp.asarray(x.T @ x / rows, jnp.float32))
        down, s, v = (np.asarray(t, np.float64) for t in out[:3])
        worst[i] = max(worst[i], np.linalg.norm(x @ (a - (down * s) @ v.T)) / optimum)
    what = f"{rows} rows < {m} features" if rows < m else f"{rows} rows, cond(X) = 1e{log_cond}"
    lines.append(f"| {what} | " + " | ".join(f"{w:.4f}" for w in worst) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if FLAGS.data_aware:
    print(data_aware())
    return
  shapes = [tuple(int(x) for x in s.split("x")) for s in FLAGS.shapes.split(",")]
  run = exact_sweep if FLAGS.exact else sweep
  rows = run(shapes, [float(p) for p in FLAGS.powers.split(",")], FLAGS.dtypes.split(","),
             [float(f) for f in FLAGS.fractions.split(",")])
  with open(FLAGS.out, "w") as f:
    json.dump(dict(argv=sys.argv[1:], rows=rows), f, indent=1)
  md = (exact_markdown if FLAGS.exact else markdown)(rows)
  with open(FLAGS.out.rsplit(".", 1)[0] + ".md", "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  app.run(main)
