r"""LLaMA-shaped `inherit` benchmark helpers: ours vs PiSSA's fast SVD vs a full SVD loop.

Used by `benchmarks.engine` (``--parts=llama`` on the CPU, ``--device`` on one
accelerator); no flags here, so the pieces are testable on their own.

The teacher is a LLaMA-style stack without biases (``blocks/attn/{query,key,value,out}``,
``blocks/mlp/{fc1,fc1_gate,fc2}`` scan-stacked over layers, an ``embed/embedding`` that is
not a kernel, ``head/kernel``) in bfloat16, under the rule ``(r"blocks/.*/kernel",
{"stack": 1})`` as in `benchmarks.memory`. Two spectra: ``gaussian`` (entries
N(0, 1/fan_in): flat spectra, a randomized SVD's worst case) and ``decaying`` (the same,
row i of each matrix scaled by (i+1)^-0.5).

Accuracy of a method's rank-r factors ``A_r`` of a matrix ``W`` (the bf16 teacher as
float64): ``||W - A_r||_F / ||W - W_r||_F``, over the optimal (Eckart-Young) error from
the float64 singular values: 1.0 is optimal. Ours are read from the inherited params:
``A_r = down/kernel @ up/kernel[head 0]``.

Example:
  ```python
  teacher = host_teacher(REDUCED, "gaussian")
  mats = slices(teacher)
  opt = optimal_errors(mats, 128)
  t, factors = time_pissa([torch_weight(w) for _, w in mats], 128, repeats=1)
  ```
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from benchmarks.common import markdown_table

SETTINGS = ("default", "fast", "exact")
SPECTRA = ("gaussian", "decaying")
STACK_RULES = ((r"blocks/.*/kernel", {"stack": 1}),)
# What each setting adds to InherSpec(rank=r, heads=H, rules=STACK_RULES).
SETTING_KWARGS = {"default": {}, "fast": {"power_iters": 2}, "exact": {"method": "exact"}}
PISSA_NITER = 4  # PiSSA / PEFT's init_lora_weights="pissa_niter_4".


@dataclasses.dataclass(frozen=True)
class Shape:
  """A LLaMA-style stack (no biases, SwiGLU MLP)."""

  layers: int
  width: int
  mlp: int
  vocab: int


REDUCED = Shape(2, 1024, 2752, 4000)
LLAMA2_7B = Shape(32, 4096, 11008, 32000)


def leaf_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of every teacher leaf, sorted by path."""
  lw = (shape.layers, shape.width)
  leaves = {f"blocks/attn/{n}/kernel": (*lw, shape.width) for n in ("query", "key", "value", "out")}
  leaves["blocks/mlp/fc1/kernel"] = (*lw, shape.mlp)
  leaves["blocks/mlp/fc1_gate/kernel"] = (*lw, shape.mlp)
  leaves["blocks/mlp/fc2/kernel"] = (shape.layers, shape.mlp, shape.width)
  leaves["embed/embedding"] = (shape.vocab, shape.width)
  leaves["head/kernel"] = (shape.width, shape.vocab)
  return dict(sorted(leaves.items()))


def spec(setting: str, rank: int, heads: int):
  """The `InherSpec` of a setting; raises TypeError where the engine lacks its fields."""
  from inhernet_jax import InherSpec

  if setting not in SETTING_KWARGS:
    raise ValueError(f"unknown setting {setting!r}, expected one of {SETTINGS}")
  return InherSpec(rank=rank, heads=heads, rules=STACK_RULES, **SETTING_KWARGS[setting])


def _row_scale(m: int) -> np.ndarray:
  return (np.arange(m, dtype=np.float64) + 1.0) ** -0.5


def host_teacher(shape: Shape, spectrum: str, seed: int = 0) -> dict[str, np.ndarray]:
  """``{path: float32 array}`` whose values are exactly bfloat16 numbers (the teacher).

  Deterministic in (shape, spectrum, seed): every process builds the same matrices."""
  import ml_dtypes

  if spectrum not in SPECTRA:
    raise ValueError(f"unknown spectrum {spectrum!r}, expected one of {SPECTRA}")
  rng = np.random.default_rng(seed)
  out = {}
  for path, dims in leaf_shapes(shape).items():
    fan_in = dims[-2] if path.endswith("kernel") else 1
    w = rng.standard_normal(dims, dtype=np.float32) / np.float32(np.sqrt(fan_in))
    if spectrum == "decaying" and path.endswith("kernel"):
      w *= _row_scale(dims[-2]).astype(np.float32)[:, None]
    out[path] = w.astype(ml_dtypes.bfloat16).astype(np.float32)
  return out


def nest(flat: dict, fn=lambda x: x) -> dict:
  """``{"a/b": x}`` -> ``{"a": {"b": fn(x)}}``."""
  nested: dict = {}
  for path, leaf in flat.items():
    node = nested
    *parents, name = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = fn(leaf)
  return nested


def slices(teacher: dict) -> list[tuple[str, np.ndarray]]:
  """Every (in, out) matrix the rule factorises: each layer of a stacked kernel, the head."""
  out = []
  for path, w in teacher.items():
    if not path.endswith("kernel"):
      continue
    if path.startswith("blocks/"):
      out += [(f"{path}[{i}]", w[i]) for i in range(w.shape[0])]
    else:
      out.append((path, w))
  return out


def slice_names(shape: Shape) -> list[str]:
  """The names `slices` gives the matrices of a teacher of this shape, in its order."""
  return [name for name, _ in slices(
      {p: np.empty((d[0], 0, 0) if p.startswith("blocks/") else (0, 0))
       for p, d in leaf_shapes(shape).items()})]


def optimal_errors(mats, rank: int) -> np.ndarray:
  """Eckart-Young error ``sqrt(sum_{i>r} s_i^2)`` of each matrix, float64 singular values."""
  errs = []
  for _, w in mats:
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    errs.append(float(np.sqrt(np.sum(s[rank:] ** 2))))
  return np.asarray(errs)


def error(w, left, right) -> float:
  """``||w - left @ right||_F`` in float64."""
  w = np.asarray(w, np.float64)
  return float(np.linalg.norm(w - np.asarray(left, np.float64) @ np.asarray(right, np.float64)))


def inherited_factors(out: dict, names) -> list[tuple]:
  """``(down, up[0])`` arrays of each matrix named by `slices`, from inherited params."""
  factors = []
  for name in names:
    path, _, layer = name.partition("[")
    node = out
    for part in path.split("/")[:-1]:
      node = node[part]
    if "down" not in node:
      raise KeyError(f"{path}: not factorised by inherit (keys {sorted(node)}), expected down/up")
    down, up = node["down"]["kernel"], node["up"]["kernel"]
    if layer:
      i = int(layer.rstrip("]"))
      down, up = down[i], up[i]
    factors.append((down, up[0]))
  return factors


def summary(errors, optimal) -> dict:
  """Error over optimal: per matrix, max and mean."""
  ratios = np.asarray(errors, np.float64) / np.asarray(optimal, np.float64)
  return {"error_over_optimal_max": float(ratios.max()),
          "error_over_optimal_mean": float(ratios.mean()),
          "error_over_optimal": [float(r) for r in ratios]}


# ------------------------------------------------------------------------------ torch
def torch_weight(w: np.ndarray):
  """A kernel slice (in, out) as a PyTorch bf16 weight (out, in), as PiSSA sees it."""
  import torch

  return torch.from_numpy(np.ascontiguousarray(w.T)).to(torch.bfloat16)


def _sync(device) -> None:
  import torch

  if device is not None and device.type == "cuda":
    torch.cuda.synchronize(device)


def time_pissa(weights, rank: int, repeats: int, keep=None):
  """PiSSA's fast SVD, ``torch.svd_lowrank(W.float(), q=r, niter=4)``, of every weight.

  Returns (best seconds over ``repeats``, the last run's ``(U S, V^T)`` per weight in
  ``keep`` (all by default), each oriented like the (in, out) kernel: ``(V, (U S)^T)``).
  """
  import torch

  keep = range(len(weights)) if keep is None else keep
  device = weights[0].device if weights else None
  best, kept = float("inf"), {}
  for _ in range(repeats):
    torch.manual_seed(0)
    _sync(device)
    t = time.perf_counter()
    res = [torch.svd_lowrank(w.float(), q=rank, niter=PISSA_NITER) for w in weights]
    _sync(device)
    best = min(best, time.perf_counter() - t)
    kept = {i: res[i] for i in keep}
    del res
  # W^T = V S U^T: left (in, r) = V, right (r, out) = (U S)^T.
  return best, {i: (v, (u * s).T) for i, (u, s, v) in kept.items()}


def time_full_svd(weights, rank: int, repeats: int):
  """A per-matrix ``torch.linalg.svd(W.float(), full_matrices=False)`` loop, truncated."""
  import torch

  best, res = float("inf"), []
  for _ in range(repeats):
    t = time.perf_counter()
    res = [torch.linalg.svd(w.float(), full_matrices=False) for w in weights]
    best = min(best, time.perf_counter() - t)
  return best, [(vh[:rank].T, (u[:, :rank] * s[:rank]).T) for u, s, vh in res]


def torch_errors(mats, factors) -> list[float]:
  """float64 errors of torch factors (in the kernel's orientation) of numpy matrices."""
  return [error(w, left.double().cpu().numpy(), right.double().cpu().numpy())
          for (_, w), (left, right) in zip(mats, factors)]


# -------------------------------------------------------------------- Markdown tables
def _s(x) -> str:
  return "n/a" if x is None else f"{x:.2f} s"


def _x(x) -> str:
  return "n/a" if x is None else f"{x:.2f}x"


def _e(x) -> str:
  return "n/a" if x is None else f"{x:.6f}"


def markdown(rows: list[dict], compile_column: bool = False) -> str:
  """The README table of ``rows`` (dicts with spectrum, method, cold_s, warm_s, ...)."""
  head = ["spectrum", "method", "cold", "warm"] + (["compile"] if compile_column else [])
  head += ["cold / PiSSA", "warm / PiSSA", "error / optimal (max)", "(mean)"]
  lines = []
  for r in rows:
    if r.get("skipped"):
      lines.append([r["spectrum"], r["method"], f"skipped: {r['skipped']}"])
      continue
    cells = [r["spectrum"], r["method"], _s(r.get("cold_s")), _s(r.get("warm_s"))]
    if compile_column:
      cells.append(_s(r.get("compile_s")))
    cells += [_x(r.get("cold_vs_pissa")), _x(r.get("warm_vs_pissa")),
              _e(r.get("error_over_optimal_max")), _e(r.get("error_over_optimal_mean"))]
    lines.append(cells)
  return markdown_table(head, lines, left=2)


def with_ratios(rows: list[dict]) -> list[dict]:
  """Adds cold/warm over PiSSA's time of the same spectrum (same run) to each row."""
  pissa = {r["spectrum"]: r.get("warm_s") for r in rows if r["method"].startswith("PiSSA")}
  for r in rows:
    base = pissa.get(r["spectrum"])
    for key in ("cold", "warm"):
      value = r.get(f"{key}_s")
      r[f"{key}_vs_pissa"] = None if value is None or not base else value / base
  return rows


# ------------------------------------------------------------------ one accelerator
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds: list[float] = []


def _on_event(event: str, duration: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    _compile_seconds.append(duration)


def device_teacher(shape: Shape, spectrum: str, seed: int = 0) -> dict:
  """The teacher born on the default device (bf16; same spectra as `host_teacher`, JAX's
  random numbers: one jitted init per leaf, no host copy)."""
  import jax
  import jax.numpy as jnp

  out = {}
  for i, (path, dims) in enumerate(leaf_shapes(shape).items()):
    fan_in = dims[-2] if path.endswith("kernel") else 1
    decay = spectrum == "decaying" and path.endswith("kernel")

    def init(key, dims=dims, fan_in=fan_in, decay=decay):
      w = jax.random.normal(key, dims, jnp.float32) / jnp.sqrt(jnp.float32(fan_in))
      if decay:
        w = w * ((jnp.arange(dims[-2], dtype=jnp.float32) + 1.0) ** -0.5)[:, None]
      return w.astype(jnp.bfloat16)

    out[path] = jax.jit(init)(jax.random.fold_in(jax.random.key(seed), i))
  return jax.block_until_ready(out)


def optimal_error_torch(w, rank: int) -> float:
  """Eckart-Young error of a float64 torch matrix from the eigenvalues of its smaller Gram
  (an accelerator's ``eigvalsh`` is much faster than its ``svdvals``): the squared
  error is ``||W||^2`` minus the top ``rank`` eigenvalues."""
  import torch

  gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
  top = torch.linalg.eigvalsh(gram)[-rank:].sum()
  return float(torch.clamp(w.square().sum() - top, min=0.0).sqrt())


def to_torch(x, device):
  """A jax array as a torch tensor on ``device``: zero-copy through DLPack when it can."""
  import torch

  try:
    t = torch.from_dlpack(x)
  except Exception:  # noqa: BLE001 - any DLPack failure: go through the host instead.
    host = np.asarray(x)
    t = (torch.from_numpy(host.view(np.uint16)).view(torch.bfloat16)
         if host.dtype.name == "bfloat16" else torch.from_numpy(host))
  return t.to(device)


def run_device(shape: Shape, rank: int, heads: int, spectra, settings=("default",),
               repeats: int = 1, error_layers: int = 1, one_device_mesh: bool = False,
               on_row=None) -> dict:
  """Ours vs PiSSA on the default device (an accelerator if there is one, else the CPU).

  Per spectrum: the teacher is generated once on the device and handed to torch through
  DLPack; ours: the first call (``cold_s``, with ``compile_s`` the JAX tracing, lowering
  and compilation time inside it) and the best of ``repeats`` further calls
  (``warm_s``); PiSSA's ``torch.svd_lowrank`` over every matrix after one warm-up call
  (its CUDA/cuSOLVER start-up, reported as ``warmup_s``). Errors over optimal on the
  matrices of the first ``error_layers`` layers only, in float64 on the device (the
  optimal error from `optimal_error_torch`). ``on_row`` is called with the result after
  every row (write it out: a killed run keeps what it measured).
  """
  import jax
  import torch

  import inhernet_jax

  dev = jax.devices()[0]
  accelerator = dev.platform != "cpu"
  tdev = torch.device("cpu")
  torch_note = None
  if accelerator:
    if dev.platform in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
      tdev = torch.device("cuda", 0)
    else:
      torch_note = f"torch {torch.__version__} has no CUDA device; PiSSA not run"
  result = {"device": str(dev), "device_kind": dev.device_kind, "platform": dev.platform,
            "accelerator": accelerator, "torch_device": None if torch_note else str(tdev),
            "shape": dataclasses.asdict(shape), "rank": rank, "heads": heads,
            "dtype": "bfloat16", "repeats": repeats, "error_layers": error_layers,
            "jax": jax.__version__, "torch": torch.__version__, "rows": []}
  print(f"device mode: JAX on {dev.device_kind} ({dev.platform})"
        + ("" if accelerator else ": no accelerator found, running on the CPU")
        + f"; torch on {'none' if torch_note else tdev}", flush=True)
  jax.monitoring.register_event_duration_secs_listener(_on_event)
  mesh = None
  if one_device_mesh:
    from inhernet_jax.parallel import sharding

    mesh = sharding.make_mesh({"data": 1}, devices=[dev])
  kwargs = {} if mesh is None else {"mesh": mesh}

  names = slice_names(shape)
  sample = [i for i, n in enumerate(names)
            if n.startswith("blocks/") and int(n.split("[")[1].rstrip("]")) < error_layers]

  def add(row):
    result["rows"].append(row)
    with_ratios(result["rows"])
    if on_row:
      on_row(result)

  for spectrum in spectra:
    t = time.perf_counter()
    teacher = device_teacher(shape, spectrum)
    gen_s = time.perf_counter() - t
    params = nest(teacher)
    tw = {p: to_torch(x, tdev) for p, x in teacher.items()} if not torch_note else None

    def weight(name):  # (in, out) kernel slice in torch, on tdev.
      path, _, layer = name.partition("[")
      return tw[path][int(layer.rstrip("]"))] if layer else tw[path]

    mats = [(names[i], weight(names[i]).double()) for i in sample] if tw else []
    optimal = [optimal_error_torch(w, rank) for _, w in mats]

    def errors(factors):
      return [float(torch.linalg.norm(w - left.double() @ right.double()))
              for (_, w), (left, right) in zip(mats, factors)]

    for setting in settings:
      row = {"spectrum": spectrum, "method": f"ours {setting}", "teacher_gen_s": gen_s}
      try:
        s = spec(setting, rank, heads)
      except TypeError as e:
        add({**row, "skipped": f"InherSpec has no {SETTING_KWARGS[setting]} ({e})"})
        continue
      n0 = len(_compile_seconds)
      t = time.perf_counter()
      out = jax.block_until_ready(inhernet_jax.inherit(params, s, **kwargs))
      row["cold_s"] = time.perf_counter() - t
      row["compile_s"] = float(sum(_compile_seconds[n0:]))
      warm = float("inf")
      for _ in range(repeats):
        del out
        n0 = len(_compile_seconds)
        t = time.perf_counter()
        out = jax.block_until_ready(inhernet_jax.inherit(params, s, **kwargs))
        warm = min(warm, time.perf_counter() - t)
        row["warm_compile_s"] = float(sum(_compile_seconds[n0:]))  # Recompiles: should be 0.
      row["warm_s"] = warm if repeats else None
      if mats:
        factors = inherited_factors(out, [names[i] for i in sample])
        row.update(summary(errors([(to_torch(d, tdev), to_torch(u, tdev)) for d, u in factors]),
                           optimal))
        del factors
      del out
      print(f"  {spectrum} {row['method']}: cold {row['cold_s']:.2f}s (compile "
            f"{row['compile_s']:.2f}s), warm {_s(row['warm_s'])}", flush=True)
      add(row)

    row = {"spectrum": spectrum, "method": f"PiSSA svd_lowrank(q=r, niter={PISSA_NITER})",
           "cold_s": None}
    if torch_note:
      add({**row, "skipped": torch_note})
    else:
      weights = [weight(n).T for n in names]  # PyTorch (out, in) weights, as views.
      t = time.perf_counter()
      torch.svd_lowrank(weights[0].float(), q=rank, niter=PISSA_NITER)
      _sync(tdev)
      row["warmup_s"] = time.perf_counter() - t
      row["warm_s"], kept = time_pissa(weights, rank, max(repeats, 1), keep=sample)
      row.update(summary(errors([kept[i] for i in sample]), optimal))
      print(f"  {spectrum} PiSSA: {row['warm_s']:.2f}s", flush=True)
      add(row)
      del weights, kept
    del teacher, params, tw, mats
    if tdev.type == "cuda":
      torch.cuda.empty_cache()
  result["matrices"] = len(names)
  result["error_matrices"] = [names[i] for i in sample]
  return result
