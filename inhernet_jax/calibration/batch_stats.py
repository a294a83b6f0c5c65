"""BatchNorm re-estimation: exact running statistics of a network over a few batches.

Right after `inherit`, an inherited CNN keeps its teacher's BatchNorm running statistics,
but its truncated layers no longer produce activations with those statistics: on a real
benchmark the inherited network can start at chance although every layer is a good
approximation. `recalibrate_batch_stats` re-estimates every `nn.BatchNorm`'s ``mean``
and ``var`` on calibration batches, without a gradient step.

The estimate is PyTorch's with ``momentum=None`` (a cumulative moving average,
``torch.optim.swa_utils.update_bn``): the network runs in training mode, so every
BatchNorm normalises with its batch's own statistics (as in training), and the running
statistics become

* ``mean`` = the average over calls of the batch means, and
* ``var`` = the average over calls of the *unbiased* batch variances
  ``n / (n - 1) * mean((x - batch_mean)^2)``, ``n`` the rows reduced over (batch x
  spatial positions); PyTorch stores the unbiased variance in ``running_var``.
  ``unbiased=False`` averages the biased variances instead (what Flax's own momentum
  update tracks).

Every call counts once, whatever its batch size (PyTorch's ``num_batches_tracked``); a
BatchNorm applied twice per forward pass counts both calls. Each batch statistic is
reduced as `nn.BatchNorm` reduces it (the module's dtype promoted to at least float32,
its ``mask`` and ``axis_name``), but always in two passes on shifted values
(`batch_moments`), whatever the module's ``use_fast_variance``: Flax's one-pass
``E[x^2] - E[x]^2`` loses the variance of activations whose mean is large against their
spread (1000 + N(0, 1): 0.599 instead of 1.046; 1e4 + N(0, 1): 18.4), while this
matches PyTorch's ``running_var`` to 1e-5 relative for means up to 1e4 and beyond
(tests/batch_stats_test.py).

Example:
  ```python
  student = teacher.clone(spec=spec)
  variables = dict(teacher_vars, params=inherit(teacher_vars["params"], spec))
  batches = (pipeline.train_batch(step) for step in range(64))
  variables = recalibrate_batch_stats(student, variables, batches)  # {"train": True}
  ```
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util
from flax.linen import normalization

SOWN = "recalibration"  # Name of the sown ``{"mean", "var", "calls"}`` in "intermediates".


def _call_args(batch) -> tuple:
  """Positional arguments of ``model.apply`` from one batch (array, tuple or dict)."""
  if isinstance(batch, Mapping):
    return (batch["input"],)
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _interceptor(unbiased: bool):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, nn.BatchNorm)
        or module.is_initializing()):
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    running = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    running = module.use_running_average if running is None else running
    if running:
      raise ValueError(
          f"recalibrate_batch_stats: BatchNorm {'/'.join(module.path) or '(root)'} ran with "
          "use_running_average=True; re-estimation needs the model in training mode (pass "
          "apply_kwargs that select it, e.g. {'train': True})")
    mask = kwargs.get("mask")
    features = normalization._canonicalize_axes(x.ndim, module.axis)
    axes = tuple(i for i in range(x.ndim) if i not in features)
    mean, var = batch_moments(
        x, axes, dtype=module.dtype, axis_name=module.axis_name,
        axis_index_groups=module.axis_index_groups, mask=mask,
        force_float32_reductions=module.force_float32_reductions)
    if unbiased:
      if mask is None:
        n = jnp.asarray(np.prod([x.shape[a] for a in axes]), mean.dtype)
      else:  # Rows counted per feature, as the masked mean counts them.
        n = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape).sum(axes).astype(mean.dtype)
      if module.axis_name is not None:
        n = jax.lax.psum(n, module.axis_name, axis_index_groups=module.axis_index_groups)
      var = var * n / (n - 1)  # n == 1 gives inf, as PyTorch refuses such a batch.
    stats = {"mean": mean, "var": var, "calls": jnp.ones((), jnp.int32)}
    module.sow("intermediates", SOWN, stats, init_fn=lambda: None,
               reduce_fn=lambda acc, v: v if acc is None else jax.tree.map(jnp.add, acc, v))
    return next_fun(*args, **kwargs)

  return intercept


def batch_moments(x, axes, *, dtype=None, axis_name=None, axis_index_groups=None, mask=None,
                  force_float32_reductions=True):
  """``(mean, biased var)`` of ``x`` over ``axes``, accurate for any mean: two passes
  on values shifted by one sample per feature.

  The shift ``c`` (the first row's value) makes ``d = x - c`` of the order of the
  spread, so the first pass's ``mean(d)`` keeps the small deviations of a large mean,
  and the second pass ``mean((d - mean(d))^2)`` has no cancellation (the mean is
  ``c + mean(d)``). Reduced as `nn.BatchNorm` reduces (dtype promotion, ``mask``,
  ``axis_name`` / ``axis_index_groups`` averaging with ``lax.pmean``).
  """
  if dtype is None:
    dtype = jnp.result_type(x)
  if force_float32_reductions:
    dtype = jnp.promote_types(dtype, jnp.float32)
  x = jnp.asarray(x, dtype)
  mask = None if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)

  def mean(v):
    mu = v.mean(axes, where=mask, keepdims=True)
    if axis_name is not None:
      mu = jax.lax.pmean(mu, axis_name, axis_index_groups=axis_index_groups)
    return mu

  first = tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))
  shift = jax.lax.stop_gradient(x[first])  # Any value works; one sample is close.
  if axis_name is not None:  # The same shift on every device.
    shift = jax.lax.pmean(shift, axis_name, axis_index_groups=axis_index_groups)
  d = x - shift  # Exact for samples within a factor 2 of the shift (Sterbenz).
  mu_d = mean(d)
  var = mean(jnp.square(jnp.abs(d - mu_d)))  # Not x - (shift + mu_d): that is rounded.
  return jnp.squeeze(shift + mu_d, axes), jnp.squeeze(var, axes)


def _sown(intermediates) -> dict[tuple, dict]:
  out = {}
  for path, value in traverse_util.flatten_dict(intermediates).items():
    if len(path) >= 2 and path[-2] == SOWN:
      out.setdefault(path[:-2], {})[path[-1]] = value
  return out


def _default_kwargs(model) -> dict:
  # A wrapper of the user's model (`surgery.linen.InheritedModel`) takes its arguments.
  inner = getattr(model, "model", None)
  model = inner if isinstance(inner, nn.Module) else model
  try:
    takes_train = "train" in inspect.signature(model.__call__).parameters
  except (TypeError, ValueError):
    takes_train = False
  return {"train": True} if takes_train else {}


def recalibrate_batch_stats(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    unbiased: bool = True,
) -> dict[str, Any]:
  """Re-estimates every BatchNorm's running ``mean`` / ``var`` over ``batches``.

  Pure: returns new variables; ``variables`` is not modified. Params and every other
  collection are returned as they are.

  Args:
    model: any Flax model whose BatchNorms are `nn.BatchNorm` (a zoo CNN, teacher or
      inherited, or a model converted from PyTorch).
    variables: its variables, ``{"params": ..., "batch_stats": ...}``.
    batches: an iterable of inputs: arrays (the first positional argument of
      ``model.apply``), tuples of positional arguments, or dicts with an ``"input"``
      entry (this package's pipelines; other entries are ignored).
    apply_kwargs: keyword arguments of every ``model.apply``; they must put the
      BatchNorms in training mode (``use_running_average=False``). Default
      ``{"train": True}`` when ``model.__call__`` takes ``train``, else ``{}``. Add
      ``rngs`` here for a model with active dropout in training mode.
    unbiased: average the unbiased batch variances (PyTorch's ``running_var``); False:
      the biased ones.

  Returns:
    ``variables`` with new ``batch_stats`` (same dtypes); a model without
    ``batch_stats`` gets ``variables`` back unchanged (as a new dict). BatchNorms that
    no batch reached keep their statistics (logged as a warning).

  Raises:
    ValueError: no batches; a BatchNorm ran with running averages (``apply_kwargs``
      do not select training mode); ``variables`` have ``batch_stats`` but no
      `nn.BatchNorm` ran; or a re-estimated statistic does not match the stored one's
      path or shape.
  """
  variables = dict(variables)
  if not variables.get("batch_stats"):
    return variables
  kwargs = _default_kwargs(model) if apply_kwargs is None else dict(apply_kwargs)
  intercept = _interceptor(bool(unbiased))

  @jax.jit
  def stats_of(variables, args):
    with nn.intercept_methods(intercept):
      _, state = model.apply(variables, *args, mutable=["intermediates", "batch_stats"],
                             **kwargs)
    return _sown(state.get("intermediates", {}))

  total = None
  for batch in batches:
    out = stats_of(variables, _call_args(batch))
    total = out if total is None else _add(total, out)
  if total is None:
    raise ValueError("recalibrate_batch_stats: batches is empty; pass at least one batch")
  if not total:
    raise ValueError(
        f"recalibrate_batch_stats: {type(model).__name__} has batch_stats but no nn.BatchNorm "
        "ran (or an nn.scan around them lacks 'intermediates' in its variable_axes)")
  old = traverse_util.flatten_dict(variables["batch_stats"])
  new = dict(old)
  for path, s in sorted(total.items()):
    for name in ("mean", "var"):
      key = (*path, name)
      where = "/".join(map(str, key))
      if key not in old:
        raise ValueError(f"recalibrate_batch_stats: BatchNorm statistic {where} has no entry "
                         f"in variables['batch_stats']")
      value = s[name] / s["calls"].astype(s[name].dtype)
      if value.shape != np.shape(old[key]):
        raise ValueError(f"recalibrate_batch_stats: batch_stats {where} has shape "
                         f"{np.shape(old[key])}, the re-estimate {value.shape}")
      new[key] = value.astype(jnp.result_type(old[key]))
  missed = sorted("/".join(map(str, k[:-1])) for k in old
                  if k[-1] in ("mean", "var") and k[:-1] not in total)
  if missed:
    logging.warning("recalibrate_batch_stats: no batch reached %d BatchNorm(s); kept: %s",
                    len(set(missed)), sorted(set(missed)))
  variables["batch_stats"] = traverse_util.unflatten_dict(new)
  return variables


@jax.jit
def _add(a, b):
  return jax.tree.map(jnp.add, a, b)
