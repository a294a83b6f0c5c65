"""Optimizers and learning-rate schedules from a config, built from optax's own parts.

`make_optimizer` reads an attribute config (an ``ml_collections.ConfigDict``; a plain
mapping works too) and returns the optax transformation and its learning-rate schedule,
which the trainer logs. Missing (or None) optional fields take the defaults below; every
option is validated up front, so a bad config fails before the first step.

Example (the paper's CIFAR recipe: SGD, lr 0.05, momentum 0.9, weight decay 5e-4,
lr x0.1 at epochs 150, 180 and 210):

```python
config = ml_collections.ConfigDict(dict(
    name="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
    weight_decay_mask="all", schedule="step", decay_epochs=(150, 180, 210)))
tx, schedule = make_optimizer(config, steps_per_epoch=391, total_steps=240 * 391)
opt_state = tx.init(params)
...
lr = schedule(step)   # for the logs
```

Config fields:

* ``name``: ``"sgd"`` (momentum; PyTorch's coupled weight decay: ``wd * params`` is added
  to the gradient *before* momentum), ``"adam"`` (coupled too, as ``torch.optim.Adam``'s
  ``weight_decay``) or ``"adamw"`` (decoupled, `optax.adamw`).
* ``learning_rate``: the peak learning rate (required).
* ``momentum`` (0.9) and ``nesterov`` (False): SGD only.
* ``b1`` (0.9), ``b2`` (0.999), ``eps`` (1e-8): Adam / AdamW, optax's defaults.
* ``weight_decay`` (0.0) and ``weight_decay_mask`` (``"kernels"``): which leaves decay;
  see `decay_mask`.
* ``grad_clip_norm`` (None or 0: off): `optax.clip_by_global_norm`, first in the chain.
* ``schedule`` (``"constant"``): ``"constant"``; ``"step"`` (times ``decay_factor``,
  default 0.1, at each epoch of ``decay_epochs``); ``"cosine"`` (linear warmup from 0 over
  ``warmup_epochs`` or ``warmup_steps``, then cosine decay to ``end_lr_factor *
  learning_rate``, default 0, at ``total_steps``); ``"warmup_constant"`` (the same
  warmup, then constant).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optax

from inhernet_jax.common import rules as rules_lib
from inhernet_jax.common import utils

SCHEDULES = ("constant", "step", "cosine", "warmup_constant")
OPTIMIZERS = ("sgd", "adam", "adamw")
MASKS = ("all", "kernels")

# Leaf names that are never "kernels" whatever their rank: under nn.scan a bias or a
# LayerNorm scale gains a layer axis, and a factorised layer's expert biases are (H, out).
_NO_DECAY_NAMES = frozenset({"bias", "scale"})

_MISSING = object()


# ------------------------------------------------------------------------ validation
def _get(config: Any, name: str, default: Any = _MISSING) -> Any:
  """``config.name`` (or ``config[name]``); None counts as unset."""
  if isinstance(config, Mapping):
    value = config.get(name)
  else:
    value = getattr(config, name, None)
  if value is None:
    if default is _MISSING:
      raise ValueError(f"optimizer config: {name} is required")
    return default
  return value


def _number(value: Any, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"optimizer config: {name} must be a number, got {value!r}")
  if not math.isfinite(value):
    raise ValueError(f"optimizer config: {name} must be finite, got {value!r}")
  return float(value)


def _in_range(value: Any, name: str, low: float, high: float | None = None, *,
              low_open: bool = False, high_open: bool = False) -> float:
  value = _number(value, name)
  ok = (value > low if low_open else value >= low) and (
      high is None or (value < high if high_open else value <= high)
  )
  if not ok:
    left = "(" if low_open else "["
    right = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
    raise ValueError(f"optimizer config: {name} must be in {left}{low}, {right}, got {value!r}")
  return value


def _positive_int(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"make_optimizer: {name} must be a positive int, got {value!r}")
  return int(value)


def _choice(value: Any, name: str, known: tuple[str, ...]) -> str:
  if value not in known:
    raise ValueError(f"optimizer config: unknown {name} {value!r}; known: {list(known)}")
  return value


# ---------------------------------------------------------------------- weight decay
def _mask_fn(which: str) -> Callable[[tuple[str, ...], Any], bool]:
  """``(path names, leaf) -> decays?`` for a validated ``weight_decay_mask``."""
  if which == "all":
    return lambda names, leaf: True
  if which == "kernels":
    return lambda names, leaf: (
        np.ndim(leaf) >= 2 and (not names or names[-1] not in _NO_DECAY_NAMES)
    )
  return lambda names, leaf: rules_lib.fullmatch(which, "/".join(names))


def _check_mask(which: Any) -> str:
  if not isinstance(which, str):
    raise TypeError(
        f"optimizer config: weight_decay_mask must be 'all', 'kernels' or a regex string, "
        f"got {which!r}"
    )
  if which not in MASKS:
    rules_lib.check_pattern(which, "optimizer config: weight_decay_mask")
  return which


def decay_mask(params: Any, which: str = "kernels") -> Any:
  """A pytree of bools like ``params``: True where weight decay applies.

  Example:
    ```python
    decay_mask({"fc": {"kernel": k, "bias": b}})   # {"fc": {"kernel": True, "bias": False}}
    ```

  Args:
    params: a parameter pytree (nested dicts, as flax's ``params``).
    which: ``"all"`` (every leaf, as PyTorch's ``weight_decay`` on
      ``model.parameters()``); ``"kernels"``: leaves of rank >= 2 not named ``bias`` or
      ``scale`` (dense and conv kernels, a factorised layer's ``down``/``up``/``gate``
      kernels, embeddings, ``pos_embed``; not biases, expert biases ``(H, out)`` or norm
      scales, even with nn.scan's layer axis); or a regex that must `re.fullmatch` the
      ``/``-joined path (e.g. ``".*kernel"``).

  Returns:
    The mask pytree (optax's ``mask`` argument).
  """
  keep = _mask_fn(_check_mask(which))
  return utils.map_with_names(lambda p, leaf: keep(tuple(p.split("/")), leaf), params)


# ------------------------------------------------------------------------- schedules
def _warmup_steps(config: Any, steps_per_epoch: int, total_steps: int, schedule: str) -> int:
  epochs = _get(config, "warmup_epochs", 0)
  steps = _get(config, "warmup_steps", 0)
  epochs = _in_range(epochs, "warmup_epochs", 0.0)
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise ValueError(f"optimizer config: warmup_steps must be an int >= 0, got {steps!r}")
  if epochs and steps:
    raise ValueError("optimizer config: set warmup_epochs or warmup_steps, not both")
  warmup = steps or round(epochs * steps_per_epoch)
  if warmup and schedule not in ("cosine", "warmup_constant"):
    raise ValueError(
        f"optimizer config: warmup is only used by the 'cosine' and 'warmup_constant' "
        f"schedules, not {schedule!r}"
    )
  # Cosine needs at least one decay step after the warmup.
  limit = total_steps - 1 if schedule == "cosine" else total_steps
  if warmup > limit:
    why = ", and cosine needs a decay step" if schedule == "cosine" else ""
    raise ValueError(
        f"optimizer config: warmup of {warmup} steps is longer than the run "
        f"(total_steps={total_steps}{why})"
    )
  return warmup


def make_schedule(config: Any, *, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule of `make_optimizer` (see the module docstring).

  Args:
    config: the optimizer config.
    steps_per_epoch: optimizer steps per epoch; converts ``decay_epochs`` and
      ``warmup_epochs`` to steps.
    total_steps: the length of the run; the cosine schedule ends there.

  Returns:
    ``schedule(step) -> learning rate``.

  Raises:
    ValueError: an unknown schedule or a bad option.
  """
  steps_per_epoch = _positive_int(steps_per_epoch, "steps_per_epoch")
  total_steps = _positive_int(total_steps, "total_steps")
  peak = _in_range(_get(config, "learning_rate"), "learning_rate", 0.0)
  kind = _choice(_get(config, "schedule", "constant"), "schedule", SCHEDULES)
  warmup = _warmup_steps(config, steps_per_epoch, total_steps, kind)
  if kind == "constant":
    return optax.constant_schedule(peak)
  if kind == "step":
    factor = _in_range(_get(config, "decay_factor", 0.1), "decay_factor", 0.0, 1.0, low_open=True)
    epochs = _get(config, "decay_epochs")
    if isinstance(epochs, numbers.Real):
      epochs = (epochs,)
    epochs = [_in_range(e, "decay_epochs", 0.0, low_open=True) for e in epochs]
    # MultiStepLR semantics: the decayed value holds from the first step of the epoch.
    boundaries = [round(e * steps_per_epoch) for e in epochs]
    if any(b <= a for a, b in zip(boundaries, boundaries[1:])):
      raise ValueError(
          f"optimizer config: decay_epochs must be strictly increasing (in steps: "
          f"{boundaries}), got {list(epochs)}"
      )
    return optax.piecewise_constant_schedule(peak, {b: factor for b in boundaries})
  if kind == "cosine":
    end = _in_range(_get(config, "end_lr_factor", 0.0), "end_lr_factor", 0.0, 1.0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total_steps,
        end_value=end * peak,
    )
  # warmup_constant: linear_schedule holds its end value after the warmup, but with no
  # warmup steps at all it would hold the *initial* value (0).
  if warmup == 0:
    return optax.constant_schedule(peak)
  return optax.linear_schedule(0.0, peak, warmup)


# ------------------------------------------------------------------------ optimizers
def make_optimizer(
    config: Any, *, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax optimizer and its learning-rate schedule, from a config.

  Example:
    ```python
    tx, schedule = make_optimizer(config.optimizer, steps_per_epoch=391, total_steps=n)
    updates, opt_state = tx.update(grads, opt_state, params)   # params are required
    params = optax.apply_updates(params, updates)
    ```

  The chain is ``clip_by_global_norm`` (if ``grad_clip_norm``), then for ``"sgd"`` /
  ``"adam"`` `optax.add_decayed_weights` (if ``weight_decay``) and `optax.sgd` /
  `optax.adam`, for ``"adamw"`` `optax.adamw` with its ``mask``. Coupled decay thus sees
  the clipped gradient, as in PyTorch with ``clip_grad_norm_`` before ``step()``.

  Args:
    config: the optimizer config (fields in the module docstring).
    steps_per_epoch: optimizer steps per epoch (for epoch-valued fields).
    total_steps: the length of the run (for the cosine schedule).

  Returns:
    ``(tx, schedule)``: the `optax.GradientTransformation` (its ``update`` needs
    ``params`` when weight decay is on) and ``schedule(step) -> learning rate``.

  Raises:
    ValueError: an unknown optimizer, schedule or mask, or an option out of range.
    TypeError: an option of the wrong type.
  """
  name = _choice(_get(config, "name"), "name", OPTIMIZERS)
  schedule = make_schedule(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  weight_decay = _in_range(_get(config, "weight_decay", 0.0), "weight_decay", 0.0)
  which = _check_mask(_get(config, "weight_decay_mask", "kernels"))
  mask = lambda params: decay_mask(params, which)  # noqa: E731 (optax takes a callable)
  clip = _in_range(_get(config, "grad_clip_norm", 0.0), "grad_clip_norm", 0.0)

  chain = [optax.clip_by_global_norm(clip)] if clip else []
  if name == "sgd":
    momentum = _in_range(_get(config, "momentum", 0.9), "momentum", 0.0, 1.0, high_open=True)
    nesterov = _get(config, "nesterov", False)
    if not isinstance(nesterov, bool):
      raise TypeError(f"optimizer config: nesterov must be a bool, got {nesterov!r}")
    if nesterov and momentum == 0:
      raise ValueError("optimizer config: nesterov needs momentum > 0")
    if weight_decay:
      chain.append(optax.add_decayed_weights(weight_decay, mask))
    chain.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  else:
    b1 = _in_range(_get(config, "b1", 0.9), "b1", 0.0, 1.0, high_open=True)
    b2 = _in_range(_get(config, "b2", 0.999), "b2", 0.0, 1.0, high_open=True)
    eps = _in_range(_get(config, "eps", 1e-8), "eps", 0.0, low_open=True)
    if name == "adam":
      if weight_decay:
        chain.append(optax.add_decayed_weights(weight_decay, mask))
      chain.append(optax.adam(schedule, b1=b1, b2=b2, eps=eps))
    else:
      chain.append(
          optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
      )
  tx = chain[0] if len(chain) == 1 else optax.chain(*chain)
  return tx, schedule


__all__ = ["MASKS", "OPTIMIZERS", "SCHEDULES", "decay_mask", "make_optimizer", "make_schedule"]
