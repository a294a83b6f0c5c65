"""Task and distillation losses: cross-entropy, Hinton KD, Decoupled KD, FitNet hints.

Pure functions of logits (or features), jit-able, always computed in float32 whatever the
input dtype (bf16 logits lose too much precision in a softmax over many classes). Logits
have the class axis last and any leading axes: ``(batch, classes)`` for classifiers,
``(batch, seq, classes)`` for token models. Every loss is a mean over all leading
positions; an optional ``mask`` of the leading shape (bool, or 0/1 or float weights)
restricts the mean to the positions it marks (padding tokens, say).

Hyper-parameters (``alpha``, ``temperature``, ...) are Python floats fixed per
experiment: close over them (`make_loss` does) rather than passing them through `jax.jit`.

Example:
  ```python
  loss_fn = make_loss("kd", alpha=0.3, temperature=7.0)   # the public demo's KD loss
  loss = loss_fn(student_logits, teacher_logits, labels)  # scalar float32
  ```

The paper's InherNet-Small is trained with KD, InherNet-Large with the plain task loss
(``"ce"``); DKD is the strongest distillation baseline it compares against.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Array = jax.Array
LossFn = Callable[..., Array]

# mdistiller masks the ground-truth logit by subtracting this before the non-target
# softmax; exp(-1000) is 0 in float32, so the class drops out without an -inf (whose
# 0 * inf would turn the KL into NaN).
_GT_MASK_OFFSET = 1000.0


# ------------------------------------------------------------------------ validation
def _is_python_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(value: Any, name: str, where: str) -> None:
  # Arrays (a scheduled weight, a tracer) pass unchecked: they cannot be inspected
  # under jit, and a schedule is the caller's responsibility.
  if isinstance(value, bool) or isinstance(value, (str, bytes)) or value is None:
    raise TypeError(f"{where}: {name} must be a float, got {value!r}")
  if _is_python_number(value) and not math.isfinite(value):
    raise ValueError(f"{where}: {name} must be finite, got {value!r}")


def _check_unit(value: Any, name: str, where: str, *, closed_top: bool = True) -> None:
  _check_number(value, name, where)
  if _is_python_number(value):
    ok = 0.0 <= value <= 1.0 if closed_top else 0.0 <= value < 1.0
    if not ok:
      bound = "[0, 1]" if closed_top else "[0, 1)"
      raise ValueError(f"{where}: {name} must be in {bound}, got {value!r}")


def _check_nonnegative(value: Any, name: str, where: str) -> None:
  _check_number(value, name, where)
  if _is_python_number(value) and value < 0:
    raise ValueError(f"{where}: {name} must be >= 0, got {value!r}")


def _check_temperature(value: Any, where: str) -> None:
  _check_number(value, "temperature", where)
  if _is_python_number(value) and not value > 0:
    raise ValueError(f"{where}: temperature must be > 0, got {value!r}")


def _check_shapes(where: str, logits: Array, labels: Array, mask: Array | None,
                  teacher: Array | None = None) -> None:
  if logits.ndim < 1:
    raise ValueError(f"{where}: logits need a class axis, got shape {logits.shape}")
  if teacher is not None and teacher.shape != logits.shape:
    raise ValueError(
        f"{where}: teacher logits {teacher.shape} and student logits {logits.shape} differ"
    )
  if labels.shape != logits.shape[:-1]:
    raise ValueError(
        f"{where}: labels must have the logits' leading shape {logits.shape[:-1]}, "
        f"got {labels.shape}"
    )
  if mask is not None and jnp.shape(mask) != logits.shape[:-1]:
    raise ValueError(
        f"{where}: mask must have the logits' leading shape {logits.shape[:-1]}, "
        f"got {jnp.shape(mask)}"
    )


# ------------------------------------------------------------------------- reductions
def _masked_mean(values: Array, mask: Array | None) -> Array:
  """Mean of per-position ``values`` over the positions ``mask`` selects (weights)."""
  if mask is None:
    return jnp.mean(values)
  weights = jnp.asarray(mask, jnp.float32)
  # where, not a product: a NaN at a padded position must not leak into the mean.
  total = jnp.sum(jnp.where(weights != 0, weights * values, 0.0))
  count = jnp.sum(weights)
  return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def _kl(log_p: Array, log_q: Array) -> Array:
  """Per-position ``KL(p || q)`` over the last axis, from log-probabilities."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _per_position_ce(logits: Array, labels: Array, label_smoothing: float) -> Array:
  if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


# ----------------------------------------------------------------------------- losses
def cross_entropy(
    logits: Array,
    labels: Array,
    *,
    label_smoothing: float = 0.0,
    mask: Array | None = None,
) -> Array:
  """Softmax cross-entropy with integer labels, averaged over positions.

  Example:
    ```python
    loss = cross_entropy(logits, labels, label_smoothing=0.1)
    ```

  Args:
    logits: ``(..., classes)``, any float dtype (computed in float32).
    labels: integer class ids of shape ``logits.shape[:-1]``, in ``[0, classes)``
      (not checked: an out-of-range id gives a meaningless loss, as in optax).
    label_smoothing: ``eps`` in ``[0, 1]``; targets become ``(1 - eps) * one_hot +
      eps / classes`` (`optax.smooth_labels`, as PyTorch's ``label_smoothing``).
    mask: optional ``logits.shape[:-1]`` weights; the mean runs over marked positions
      (0 when none is marked).

  Returns:
    A float32 scalar.
  """
  where = "cross_entropy"
  _check_unit(label_smoothing, "label_smoothing", where)
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _check_shapes(where, logits, labels, mask)
  per_position = _per_position_ce(logits.astype(jnp.float32), labels, label_smoothing)
  return _masked_mean(per_position, mask)


def kd(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    alpha: float,
    temperature: float,
    mask: Array | None = None,
) -> Array:
  """Hinton knowledge distillation: ``alpha * CE + (1 - alpha) * T^2 * KL``.

  ``KL = KL(softmax(teacher / T) || softmax(student / T))`` summed over classes and
  averaged over positions (PyTorch's ``reduction="batchmean"``). The ``T^2`` keeps the
  soft-target gradients on the scale of the hard-target ones as ``T`` changes (Hinton
  et al., 2015). The teacher gets `jax.lax.stop_gradient`, so a teacher that shares a
  parameter tree with the student is not trained through this term.

  The public InherNet demo's KD baseline is ``0.3 * CE + 0.7 * T^2 * KL`` with ``T = 7``,
  i.e. ``kd(..., alpha=0.3, temperature=7.0)``; the paper's GLUE runs use weight 0.3 and
  ``T = 4``.

  Example:
    ```python
    loss = kd(student_logits, teacher_logits, labels, alpha=0.3, temperature=7.0)
    ```

  Args:
    student_logits: ``(..., classes)``, any float dtype (computed in float32).
    teacher_logits: same shape as ``student_logits``.
    labels: integer class ids of shape ``student_logits.shape[:-1]``.
    alpha: weight of the hard-label cross-entropy, in ``[0, 1]`` (1 gives plain CE).
    temperature: softmax temperature ``T > 0`` of the KL term.
    mask: optional ``student_logits.shape[:-1]`` weights for the mean over positions.

  Returns:
    A float32 scalar.
  """
  where = "kd"
  _check_unit(alpha, "alpha", where)
  _check_temperature(temperature, where)
  student, teacher = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
  labels = jnp.asarray(labels)
  _check_shapes(where, student, labels, mask, teacher)
  student = student.astype(jnp.float32)
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  ce = optax.softmax_cross_entropy_with_integer_labels(student, labels)
  kl = _kl(jax.nn.log_softmax(teacher / temperature), jax.nn.log_softmax(student / temperature))
  per_position = alpha * ce + (1.0 - alpha) * temperature**2 * kl
  return _masked_mean(per_position, mask)


def dkd(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    mask: Array | None = None,
) -> Array:
  """Decoupled knowledge distillation (Zhao et al., CVPR 2022): ``alpha*TCKD + beta*NCKD``.

  As mdistiller's ``dkd_loss``, with ``p = softmax(logits / T)`` and ``g`` the
  ground-truth class:

  * TCKD: KL between the binary distributions ``(p_g, 1 - p_g)`` of teacher and
    student (target class vs. all the others), times ``T^2``;
  * NCKD: KL between teacher and student softmaxes over the non-target classes, the gt
    logit masked by subtracting 1000 from ``logits / T`` before the softmax, times
    ``T^2``.

  Each KL is averaged over positions. The binary log-probabilities are computed in log
  space (``log(1 - p_g) = logsumexp`` of the masked logits ``- logsumexp`` of all):
  mdistiller's ``log`` of summed probabilities is the same quantity but gives ``-inf``
  once ``1 - p_g`` underflows.

  The cross-entropy term is NOT included: mdistiller's DKD objective is
  ``ce_weight * cross_entropy(...) + w(epoch) * dkd(...)`` with the warm-up ``w(epoch) =
  min(epoch / 20, 1)``; ``make_loss("dkd", ce_weight=1.0, warmup_steps=N)`` builds it
  (a config's ``warmup_epochs`` is turned into steps by the trainer). Defaults are mdistiller's CIFAR-100 settings
  (``alpha=1, beta=8, T=4``; ``beta`` is tuned per teacher-student pair there).

  Example:
    ```python
    loss = cross_entropy(s, y) + min(epoch / 20, 1.0) * dkd(s, t, y, beta=8.0)
    ```

  Args:
    student_logits: ``(..., classes)``, any float dtype (computed in float32).
    teacher_logits: same shape as ``student_logits`` (gradient stopped).
    labels: integer class ids of shape ``student_logits.shape[:-1]``.
    alpha: weight of TCKD, >= 0.
    beta: weight of NCKD, >= 0.
    temperature: softmax temperature ``T > 0``.
    mask: optional ``student_logits.shape[:-1]`` weights for the mean over positions.

  Returns:
    A float32 scalar.
  """
  where = "dkd"
  _check_nonnegative(alpha, "alpha", where)
  _check_nonnegative(beta, "beta", where)
  _check_temperature(temperature, where)
  student, teacher = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
  labels = jnp.asarray(labels)
  _check_shapes(where, student, labels, mask, teacher)
  gt = jax.nn.one_hot(labels, student.shape[-1], dtype=jnp.bool_)

  def log_parts(logits):
    z = logits.astype(jnp.float32) / temperature
    log_p = jax.nn.log_softmax(z)
    masked = z - _GT_MASK_OFFSET * gt
    log_target = jnp.sum(jnp.where(gt, log_p, 0.0), axis=-1)
    log_other = jax.nn.logsumexp(masked, axis=-1) - jax.nn.logsumexp(z, axis=-1)
    binary = jnp.stack([log_target, log_other], axis=-1)
    return binary, jax.nn.log_softmax(masked)

  student_binary, student_other = log_parts(student)
  teacher_binary, teacher_other = log_parts(jax.lax.stop_gradient(teacher))
  tckd = _kl(teacher_binary, student_binary)
  nckd = _kl(teacher_other, student_other)
  per_position = temperature**2 * (alpha * tckd + beta * nckd)
  return _masked_mean(per_position, mask)


# ---------------------------------------------------------------------- FitNet hints
class HintConnector(nn.Module):
  """FitNet regressor: a learned linear map from student to teacher feature width.

  Acts on the last (channel) axis, so the one module serves vectors ``(batch, C)``,
  tokens ``(batch, seq, C)`` and NHWC maps ``(batch, h, w, C)``, where a Dense on the
  channel axis *is* a 1x1 convolution (stride 1). The spatial size is not changed: the
  student and teacher maps must already agree on it. Parameters: ``{"proj": {"kernel":
  (C_student, features), "bias": (features,)}}`` whatever the input rank.

  Example:
    ```python
    connector = HintConnector(features=teacher_feats.shape[-1])
    params = connector.init(key, student_feats)["params"]
    loss = fitnet_hint(student_feats, teacher_feats, params)
    ```

  Attributes:
    features: the teacher's channel width.
  """

  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.Dense(self.features, name="proj")(x)


def hint_loss(projected_student: Array, teacher_features: Array) -> Array:
  """FitNet hint loss: mean squared error over all elements (PyTorch ``MSELoss()``).

  The teacher features get `jax.lax.stop_gradient`.

  Example:
    ```python
    loss = hint_loss(connector.apply({"params": p}, s_feats), t_feats)
    ```

  Args:
    projected_student: the student's features after the connector.
    teacher_features: the teacher's features, same shape.

  Returns:
    A float32 scalar.
  """
  student = jnp.asarray(projected_student)
  teacher = jnp.asarray(teacher_features)
  if student.shape != teacher.shape:
    raise ValueError(
        f"hint_loss: projected student features {student.shape} and teacher features "
        f"{teacher.shape} differ (project the student with HintConnector first)"
    )
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  return jnp.mean(jnp.square(student.astype(jnp.float32) - teacher))


def fitnet_hint(
    student_features: Array,
    teacher_features: Array,
    connector_params: Any = None,
) -> Array:
  """FitNet hint loss ``MSE(connector(student), teacher)`` in one call.

  Example:
    ```python
    params = HintConnector(t.shape[-1]).init(key, s)["params"]
    loss = fitnet_hint(s, t, params)   # differentiable wrt params and s
    ```

  Args:
    student_features: ``(..., C_student)``.
    teacher_features: ``(..., C_teacher)``, the same leading shape.
    connector_params: the `HintConnector` params (``{"proj": ...}``, or the variables
      dict ``{"params": {"proj": ...}}``). None means no connector: the student's
      features must already have the teacher's shape.

  Returns:
    A float32 scalar.
  """
  projected = student_features
  if connector_params is not None:
    variables = connector_params if "params" in connector_params else {"params": connector_params}
    width = jnp.shape(teacher_features)[-1]
    projected = HintConnector(features=width).apply(variables, student_features)
  return hint_loss(projected, teacher_features)


# ---------------------------------------------------------------------------- configs
LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "kd": kd, "dkd": dkd}

# mdistiller's objective around DKD (`make_loss` options): the CE weight, the warm-up.
DKD_OBJECTIVE = ("ce_weight", "warmup_steps")

# Losses that read the teacher's logits (the others ignore them).
_NEEDS_TEACHER = frozenset({"kd", "dkd"})


def _options(fn: LossFn) -> tuple[str, ...]:
  params = inspect.signature(fn).parameters.values()
  return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "mask")


def make_loss(name: str, **kwargs: Any) -> Callable[..., Array]:
  """A loss from a config, with one signature for every kind.

  Options are validated here, once, so a bad config fails before training starts.

  Example:
    ```python
    loss_fn = make_loss(config.loss, **config.loss_kwargs)   # e.g. "kd", alpha=0.3, ...
    loss = loss_fn(student_logits, teacher_logits, labels, mask)
    ```

  ``"dkd"`` also takes mdistiller's objective around the loss (`DKD_OBJECTIVE`):
  ``ce_weight`` (default 0: the bare `dkd` term) adds ``ce_weight * CE``, and
  ``warmup_steps`` (default 0: none) multiplies the DKD term by ``min(step /
  warmup_steps, 1)``, mdistiller's linear warm-up (``min(epoch / 20, 1)`` there, per
  epoch; per step here): the loss then takes ``step=`` (the trainer passes it).

  Args:
    name: a key of `LOSSES`: ``"ce"``, ``"kd"`` or ``"dkd"``.
    **kwargs: that loss's keyword options (``label_smoothing`` for ``"ce"``; ``alpha``,
      ``temperature`` for ``"kd"``; ``alpha``, ``beta``, ``temperature``, ``ce_weight``,
      ``warmup_steps`` for ``"dkd"``).

  Returns:
    ``loss_fn(student_logits, teacher_logits, labels, mask=None, step=None) -> float32
    scalar``; ``"ce"`` ignores ``teacher_logits`` (None is fine), the KD losses raise
    ValueError when it is None; ``step`` (the optimizer step, an int or a traced int)
    is read by a DKD warm-up only.

  Raises:
    ValueError: an unknown loss name, or an option out of range.
    TypeError: an option the loss does not take, or one that is not a number.
  """
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
  fn = LOSSES[name]
  kwargs = dict(kwargs)
  objective = {}
  if name == "dkd":
    objective = {k: kwargs.pop(k) for k in DKD_OBJECTIVE if k in kwargs}
    where = "make_loss('dkd')"
    if "ce_weight" in objective:
      _check_nonnegative(objective["ce_weight"], "ce_weight", where)
    steps = objective.get("warmup_steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
      raise ValueError(f"{where}: warmup_steps must be an int >= 0, got {steps!r}")
  allowed = _options(fn)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise TypeError(f"loss {name!r} takes options {list(allowed)}, got unknown {unknown}")
  missing = [
      k for k, p in inspect.signature(fn).parameters.items()
      if k in allowed and p.default is p.empty and k not in kwargs
  ]
  if missing:
    raise TypeError(f"loss {name!r} needs options {missing}")
  where = f"make_loss({name!r})"
  if "label_smoothing" in kwargs:
    _check_unit(kwargs["label_smoothing"], "label_smoothing", where)
  if "temperature" in kwargs:
    _check_temperature(kwargs["temperature"], where)
  if name == "kd":
    _check_unit(kwargs["alpha"], "alpha", where)
  for key in ("alpha", "beta") if name == "dkd" else ():
    if key in kwargs:
      _check_nonnegative(kwargs[key], key, where)

  ce_weight = float(objective.get("ce_weight", 0.0))
  warmup = int(objective.get("warmup_steps", 0))

  def loss_fn(student_logits, teacher_logits, labels, mask=None, step=None):
    if name not in _NEEDS_TEACHER:
      return fn(student_logits, labels, mask=mask, **kwargs)
    if teacher_logits is None:
      raise ValueError(f"loss {name!r} needs teacher_logits, got None")
    loss = fn(student_logits, teacher_logits, labels, mask=mask, **kwargs)
    if warmup:
      if step is None:
        raise ValueError(f"loss {name!r} with warmup_steps={warmup} needs step=")
      loss = jnp.minimum(jnp.asarray(step, jnp.float32) / warmup, 1.0) * loss
    if ce_weight:
      loss = loss + ce_weight * cross_entropy(student_logits, labels, mask=mask)
    return loss

  loss_fn.__name__ = f"{name}_loss"
  loss_fn.takes_step = True
  return loss_fn
