"""Calibration statistics for data-aware inheritance: per-kernel input Grams.

Data-aware inheritance (``InherSpec(data_aware=True)``, see `svd.whitened_svd`) truncates
each kernel ``A`` for its output error ``||X (A - A_r)||_F`` on calibration inputs ``X``
instead of its weight error. It needs only each kernel's input Gram ``G = X^T X``
(``m x m``), where ``X`` is the matrix the kernel multiplies: a Dense layer's inputs as
``(rows, m)``, a conv's im2col patches ``(rows, kh*kw*C_in)`` in the kernel's
``(kh, kw, C_in)`` order, with the conv's own strides, padding and dilations.

`input_grams` runs the teacher on a few batches with an interceptor on every
`nn.Dense` / `nn.Conv` (`InherDense` / `InherConv` included) that sows each layer's Gram
into the ``"intermediates"`` collection, so scan-stacked layers (`nn.scan` with
``"intermediates"`` in its ``variable_axes``, as in `models.transformer`) come out stacked
along their layer axis, like their kernels. Paths are the kernels' ``"/"``-joined param
paths, as `inherit` names them. `output_error` and `inherited_output_errors` measure the
relative output error from a Gram alone (trace form, no activations).
`recalibrate_batch_stats` (from `inhernet_jax.calibration.batch_stats`) re-estimates an inherited
network's BatchNorm statistics on calibration batches.

Example:
  ```python
  grams = calibration.input_grams(teacher, variables, [x[:256], x[256:512]],
                                  apply_kwargs={"train": False})
  spec = InherSpec(rank=8, heads=3, data_aware=True, rules=models.preset("default", "cnn"))
  student_params = inherit(variables["params"], spec, calibration=grams)
  held_out = calibration.input_grams(teacher, variables, [x_test], apply_kwargs={"train": False})
  errors = calibration.inherited_output_errors(variables["params"], student_params, held_out)
  ```
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen.linear import canonicalize_padding

from inhernet_jax.decomposition import svd
from inhernet_jax.decomposition.assemble import note_whitening as _note_whitening
from inhernet_jax.decomposition.plan import collect as _collect
from inhernet_jax.decomposition.plan import gram_of as _gram_of
from inhernet_jax.decomposition.plan import on_host as _on_host
from inhernet_jax.decomposition.spec import InherSpec, as_spec

GRAM = "input_gram"  # Name of the sown ``{"gram", "count"}`` in "intermediates".
_HIGHEST = jax.lax.Precision.HIGHEST  # Patches and Grams in full float32 (no TF32/bf16 passes).


# ----------------------------------------------------------------------- inputs
def conv_patches(module: nn.Conv, inputs: jax.Array) -> jax.Array:
  """The im2col matrix ``(rows, kh*kw*C_in)`` of ``module``'s inputs: the conv's output
  is ``patches @ kernel.reshape(-1, C_out)`` (rows: batch and output positions).

  Follows `nn.Conv`: leading batch axes flattened, int / pair / string padding
  (``CIRCULAR``, ``REFLECT`` and ``CAUSAL`` pad the inputs first), strides and dilations.
  """
  size = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
  nd = len(size)

  def broadcast(x):
    x = 1 if x is None else x
    return (x,) * nd if isinstance(x, int) else tuple(x)

  strides, lhs_dilation, rhs_dilation = map(
      broadcast, (module.strides, module.input_dilation, module.kernel_dilation))
  x = inputs.reshape(-1, *inputs.shape[inputs.ndim - nd - 1 :]).astype(svd.compute_dtype())
  padding = canonicalize_padding(module.padding, nd)
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(size, rhs_dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
    padding = "VALID"
  elif padding == "CAUSAL":
    x = jnp.pad(x, [(0, 0), (rhs_dilation[0] * (size[0] - 1), 0), (0, 0)])
    padding = "VALID"
  spatial = "DHW"[3 - nd :] if nd <= 3 else "".join(chr(ord("a") + i) for i in range(nd))
  lhs = f"N{spatial}C"
  patches = jax.lax.conv_general_dilated_patches(
      x, size, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=(lhs, f"{spatial}IO", lhs), precision=_HIGHEST)
  # Features come channel-major, (C_in, *size); the kernel matrix is (*size, C_in).
  c = x.shape[-1]
  patches = patches.reshape(-1, c, int(np.prod(size)))
  return jnp.swapaxes(patches, -1, -2).reshape(-1, c * int(np.prod(size)))


def input_matrix(module: nn.Module, inputs: jax.Array) -> jax.Array | None:
  """The ``(rows, m)`` matrix that ``module``'s kernel multiplies, or None for layers
  that are not one matrix product (grouped or masked convs)."""
  if isinstance(module, nn.Dense):
    return inputs.reshape(-1, inputs.shape[-1]).astype(svd.compute_dtype())
  if isinstance(module, nn.Conv) and module.feature_group_count == 1 and module.mask is None:
    return conv_patches(module, inputs)
  return None


def _interceptor(active: list):
  """Sows the input Gram of each Dense / Conv call (once: `InherDense` calls
  ``nn.Dense.__call__`` on itself, which is intercepted too)."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv))
        or any(m is module for m in active)):
      return next_fun(*args, **kwargs)
    active.append(module)
    try:
      x = input_matrix(module, args[0] if args else kwargs["inputs"])
      if x is not None:
        stats = {"gram": jnp.matmul(x.T, x, precision=_HIGHEST),
                 "count": jnp.asarray(x.shape[0], jnp.int32)}
        # Summed over calls: a layer applied twice sees both inputs.
        module.sow("intermediates", GRAM, stats, init_fn=lambda: None,
                   reduce_fn=lambda acc, v: v if acc is None else jax.tree.map(jnp.add, acc, v))
      return next_fun(*args, **kwargs)
    finally:
      active.pop()

  return intercept


def _sown(intermediates) -> dict[str, dict]:
  flat = traverse_util.flatten_dict(intermediates, sep="/")
  out = {}
  for path, value in flat.items():
    head, sep, leaf = path.rpartition(f"{GRAM}/")
    if sep and leaf in ("gram", "count"):
      out.setdefault(f"{head}kernel", {})[leaf] = value
  return out


def input_grams(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
  """Input Grams of every Dense / Conv kernel of ``model`` over calibration batches.

  Args:
    model: the teacher (``spec=None``: its layers are `nn.Dense` / `nn.Conv`).
    variables: its variables (``{"params": ..., "batch_stats": ...}``).
    batches: an iterable of inputs: arrays (the first positional argument of
      ``model.apply``), tuples of positional arguments, or dicts with an ``"input"``
      entry (this package's pipelines; other entries are ignored).
    apply_kwargs: keyword arguments of every ``model.apply`` (``{"train": False}``).

  Returns:
    ``{kernel path: {"gram": (*stack, m, m), "count": rows}}``: ``X^T X`` summed over
    batches and calls (`svd.compute_dtype`), ``rows`` the number of rows of ``X`` per
    layer (an int; an array if the slices of a stack saw different counts). Padding
    tokens count as rows like any other.

  Raises:
    ValueError: no batches, or the model called no Dense / Conv layer.
  """
  kwargs = dict(apply_kwargs or {})

  @jax.jit
  def grams_of(variables, args):
    with nn.intercept_methods(_interceptor([])):
      _, state = model.apply(variables, *args, mutable=["intermediates"], **kwargs)
    return _sown(state.get("intermediates", {}))

  total, counts = None, None
  for batch in batches:
    if isinstance(batch, Mapping):
      args = (batch["input"],)
    else:
      args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    out = grams_of(variables, args)
    grams = {p: o["gram"] for p, o in out.items()}
    rows = jax.device_get({p: o["count"] for p, o in out.items()})
    rows = {p: np.asarray(c, np.int64) for p, c in rows.items()}
    total = grams if total is None else _add(total, grams)
    counts = rows if counts is None else {p: counts[p] + rows[p] for p in rows}
  if total is None:
    raise ValueError("input_grams: batches is empty; pass at least one calibration batch")
  if not total:
    raise ValueError(
        f"input_grams: {type(model).__name__} called no nn.Dense / nn.Conv layer (or an "
        "nn.scan around them lacks 'intermediates' in its variable_axes)")
  return {p: {"gram": total[p], "count": _count(counts[p])} for p in sorted(total)}


@jax.jit
def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _count(c: np.ndarray):
  return int(c.flat[0]) if np.all(c == c.flat[0]) else c


# ----------------------------------------------------------------------- errors
def output_error(kernel, approx, gram) -> float | np.ndarray:
  """``||X (A - A_r)||_F / ||X A||_F`` for inputs with Gram ``gram = X^T X``.

  In trace form, ``tr(E^T G E) / tr(A^T G A)`` (float64, on the host). ``kernel`` and
  ``approx`` are kernels of any layout (or their ``(*stack, m, n)`` matrices); the
  Gram's leading axes are their stack axes.

  Returns:
    A float, or an array ``(*stack,)`` for stacked kernels (0 where ``X A = 0 = X A_r``,
    inf where only ``X A`` is zero).
  """
  g = np.asarray(gram, np.float64)
  stack = g.ndim - 2
  a = np.asarray(svd.as_matrix(np.asarray(kernel, np.float64), stack))
  e = a - np.asarray(svd.as_matrix(np.asarray(approx, np.float64), stack))
  if a.shape[-2] != g.shape[-1] or g.shape[:stack] != a.shape[:stack] or e.shape != a.shape:
    raise ValueError(
        f"output_error: kernel matrix {a.shape}, approximation {e.shape} and Gram {g.shape} "
        "do not agree: expected (*stack, m, n), (*stack, m, n) and (*stack, m, m)")
  num = np.einsum("...ij,...ij->...", e, g @ e)
  den = np.einsum("...ij,...ij->...", a, g @ a)
  with np.errstate(divide="ignore", invalid="ignore"):
    err = np.where(den > 0, np.sqrt(np.maximum(num, 0) / den), np.where(num > 0, np.inf, 0.0))
  return float(err) if err.ndim == 0 else err


def inherited_output_errors(teacher_params, inherited_params, grams) -> dict[str, Any]:
  """The relative output error (`output_error`) of every inherited layer at init.

  Right after `inherit` every head of a layer is the same, so the layer computes
  ``A_r = down @ up[head 0]`` (biases aside). Kept layers are left out.

  Args:
    teacher_params: the teacher's ``params``.
    inherited_params: ``inherit(teacher_params, ...)``.
    grams: `input_grams` of (held-out) inputs, by kernel path.

  Returns:
    ``{kernel path: float or (*stack,) array}`` for every kernel with a Gram that the
    inherited params factorise.
  """
  teacher = traverse_util.flatten_dict(teacher_params, sep="/")
  student = traverse_util.flatten_dict(inherited_params, sep="/")
  out = {}
  for path, entry in grams.items():
    prefix = path[: -len("kernel")]
    down, up = student.get(f"{prefix}down/kernel"), student.get(f"{prefix}up/kernel")
    if down is None or up is None or path not in teacher:
      continue
    gram = entry["gram"] if isinstance(entry, Mapping) else entry
    stack = np.ndim(gram) - 2
    down = np.asarray(svd.as_matrix(np.asarray(down, np.float64), stack))
    approx = down @ np.asarray(up, np.float64)[..., 0, :, :]
    out[path] = output_error(teacher[path], approx, gram)
  return out


# ----------------------------------------------------------- spectra for allocation
def whitened_spectra(params, calibration: Mapping[str, Any], spec: InherSpec | None = None
                     ) -> dict[str, np.ndarray]:
  """Output-energy spectra: the singular values of ``F A`` for every kernel.

  ``F^T F`` is the kernel's damped per-row input Gram, factored as `svd.whitened_svd`
  factors it (`svd.whitening_factor`: the Cholesky where it holds, else the Gram's
  eigendecomposition, so singular Grams of rank-deficient inputs and undamped ones
  included), so ``sum_{i>r} s_i^2`` is the (damped) mean squared output error of the
  best rank-r data-aware truncation, the one `inherit` computes, comparable across
  layers. For rank allocation, in the format of ``budget.allocate(..., spectra=...)``.
  Where the Gram is not finite, the weight's own singular values, with a warning.

  Args:
    params: the teacher's ``params``.
    calibration: Grams from `inhernet_jax.calibration.grams.input_grams`; every kernel needs
      one (ValueError naming the path otherwise).
    spec: its rules choose the kernels (those skipped by a rule are left out) and stack
      axes; its ``damping`` the ridge (default `svd.DAMPING`). None: every kernel.

  Returns:
    ``{kernel path: (*stack, min(m, n)) float64 array}``, singular values descending.
  """
  spec = InherSpec(rank=1.0) if spec is None else as_spec(spec)
  out = {}
  for k in _collect(params, spec):
    if k.plan is not None:  # Skipped by a rule.
      continue
    gram, count = _gram_of(k, calibration, required=True)
    host = _on_host(k.kernel)
    xp = np if host else jnp
    if host:
      gram, count = np.asarray(gram), np.asarray(count, np.float64)
    values, ok = (_spectra if host else _spectra_jit)(
        k.matrices(), gram.reshape(-1, k.m, k.m), xp.asarray(count), spec.damping, xp=xp)
    _note_whitening([k], ok, spec.damping)
    out[k.path] = np.asarray(values, np.float64).reshape(*k.stack_shape, -1)
  return out


def _spectra(a, gram, count, damping, *, xp):
  return svd.whitened_values(a, gram / count[..., None, None], damping, xp=xp)


_spectra_jit = jax.jit(_spectra, static_argnames=("xp",))
