"""The whole experiment config checked before anything trains.

`experiment.train_and_evaluate` calls `check_config` first (through `preflight.check_run`, which
then builds the models, specs, mesh and data on shapes), so that ``epochs=-1``, rank 0,
heads 0, an unknown method or loss, or ``batch_size=0`` is one error listing every bad
field, not a failure hours later after the teacher and earlier runs have trained.
`parse_rank` reads a method's rank, so that ``--config.method_defs.inherit.rank=8`` (a
string on the command line: the field is declared as a string) works for ints,
fractions, ``params:<method>`` and ``student:<zoo model>`` alike.

Example:
  ```python
  validate.check_config(config)    # ConfigError naming every offending field
  validate.parse_rank("0.25", "config.method_defs.inherit.rank")  # 0.25
  ```
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from inhernet_jax import models
from inhernet_jax.decomposition import budget
from inhernet_jax.training import losses
from inhernet_jax.training import optim
from inhernet_jax.models import sizes
from inhernet_jax.decomposition import svd
from inhernet_jax.data import pipeline as data_lib
from inhernet_jax.decomposition.spec import VARIANTS
from inhernet_jax.experiment.records import INITS, KINDS, MethodDef

_default = MethodDef.default  # The method fields' defaults, kept in one place.
# Every field a method definition may have (a typo is an error, not silently ignored), by
# the kind that reads it (`records.MethodDef` holds them all).
METHOD_FIELDS = {
    "common": ("kind", "label", "loss", "loss_kwargs", "hint", "optimizer"),
    "student": ("model", "kwargs"),
    "inhernet": ("rank", "heads", "preset", "init", "variant", "data_aware", "calibration_batches",
                 "allocation", "objective", "svd", "sweep", "recalibrate",
                 "recalibration_batches", "init_key"),
}
ALLOCATIONS = ("uniform", "greedy")


class ConfigError(ValueError):
  """An experiment config that cannot run (the message lists every bad field)."""


def _dict(node) -> dict:
  if node is None:
    return {}
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else dict(node)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def parse_rank(value: Any, where: str) -> int | float | str:
  """A method's rank: an int >= 1, a fraction in (0, 1], ``"params:<method>"`` (as large as
  another method) or ``"student:<zoo model>"`` (as large as that zoo model, `sizes`).

  Strings of numbers (command-line overrides of a string field) become numbers: ``"8"``
  is 8, ``"0.25"`` is 0.25, ``"1.0"`` is the full-rank fraction 1.0.

  Raises:
    ConfigError: anything else, naming ``where``.
  """
  if isinstance(value, str):
    text = value.strip()
    kind, sep, named = text.partition(":")
    if sep and kind.strip() in sizes.KINDS:
      if not named.strip():
        what = "a method" if kind.strip() == "params" else "a zoo model"
        raise ConfigError(f"{where}: '{kind.strip()}:' needs {what} name, got {value!r}")
      return text
    try:
      value = int(text)
    except ValueError:
      try:
        value = float(text)
      except ValueError:
        raise ConfigError(f"{where}: expected an int >= 1, a fraction in (0, 1], "
                          f"'params:<method>' or 'student:<zoo model>', got {value!r}") from None
  if _is_int(value):
    if value < 1:
      raise ConfigError(f"{where}: a rank must be >= 1, got {value}")
    return value
  if isinstance(value, float) and not isinstance(value, bool):
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
      raise ConfigError(f"{where}: a fractional rank must be in (0, 1], got {value!r}")
    return value
  raise ConfigError(f"{where}: expected an int >= 1, a fraction in (0, 1], "
                    f"'params:<method>' or 'student:<zoo model>', "
                    f"got {type(value).__name__} {value!r}")


class _Problems(list):
  def check(self, ok: bool, message: str) -> bool:
    if not ok:
      self.append(message)
    return ok

  def call(self, where: str, fn, *args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except (TypeError, ValueError, KeyError) as e:
      self.append(str(e) if str(e).startswith(where) else f"{where}: {e}")
      return None


def _int_at_least(p: _Problems, config, name: str, minimum: int, default=None) -> None:
  value = config.get(name, default)
  p.check(_is_int(value) and value >= minimum,
          f"config.{name}: expected an int >= {minimum}, got {value!r}")


def _check_optimizer(p: _Problems, where: str, config, override) -> None:
  opt = _dict(config.get("optimizer"))
  opt.update(_dict(override))
  if p.check(bool(opt), f"{where}: no optimizer config"):
    # Its fields and ranges; whether a warmup fits the run needs the data (checked then).
    p.call(where, optim.make_optimizer, ml_collections.ConfigDict(opt), steps_per_epoch=1000,
           total_steps=10**9)


def _check_loss(p: _Problems, where: str, md: Mapping) -> None:
  loss = md.get("loss", _default("loss"))
  kwargs = _dict(md.get("loss_kwargs"))
  if loss == "fitnet":
    hint = _dict(md.get("hint"))
    for key in ("student_layer", "teacher_layer"):
      p.check(isinstance(hint.get(key), str) and hint.get(key),
              f"{where}.hint.{key}: loss 'fitnet' needs a module path, got {hint.get(key)!r}")
    weight = hint.get("weight", 1.0)
    p.check(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0,
            f"{where}.hint.weight: expected a number > 0, got {weight!r}")
    loss = "ce"
  elif not p.check(loss in losses.LOSSES,
                   f"{where}.loss: unknown loss {loss!r}; known: {[*losses.LOSSES, 'fitnet']}"):
    return
  if loss == "dkd" and "warmup_epochs" in kwargs:  # The trainer turns it into steps.
    epochs = kwargs.pop("warmup_epochs")
    p.check(isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and epochs >= 0,
            f"{where}.loss_kwargs.warmup_epochs: expected a number >= 0, got {epochs!r}")
  p.call(f"{where}.loss_kwargs", losses.make_loss, loss, **kwargs)


def _check_method(p: _Problems, config, name: str, md: Mapping, students: list[str]) -> None:
  where = f"config.method_defs.{name}"
  kind = md.get("kind")
  if not p.check(kind in KINDS, f"{where}.kind: expected one of {KINDS}, got {kind!r}"):
    return
  known = METHOD_FIELDS["common"] + METHOD_FIELDS[kind]
  unknown = sorted(set(md) - set(known))
  p.check(not unknown, f"{where}: unknown fields {unknown} for a {kind}; known: {sorted(known)}")
  _check_loss(p, where, md)
  if md.get("optimizer"):
    _check_optimizer(p, f"{where}.optimizer", config, md.get("optimizer"))
  if kind == "student":
    p.check(md.get("model") in models.NAMES,
            f"{where}.model: unknown model {md.get('model')!r}; known: {', '.join(models.NAMES)}")
    return
  swept = (bool((_dict(config.get("sweep")).get("ranks") or ()))
           and md.get("sweep", _default("sweep")))
  rank = None if swept else p.call(f"{where}.rank", parse_rank, md.get("rank"), f"{where}.rank")
  if isinstance(rank, str):  # (A sweep's ranks replace the method's own.)
    kind, other = (part.strip() for part in rank.split(":", 1))
    if kind == "params":
      p.check(other in students, f"{where}.rank {rank!r}: {other!r} is not a student method "
                                 f"run before it (students before it: {students})")
    else:
      p.check(other in models.NAMES, f"{where}.rank {rank!r}: unknown zoo model {other!r}; "
                                     f"known: {', '.join(models.NAMES)}")
  heads = md.get("heads", _default("heads"))
  p.check(_is_int(heads) and heads >= 1, f"{where}.heads: expected an int >= 1, got {heads!r}")
  for field, choices in (("init", INITS), ("variant", VARIANTS), ("preset", models.PRESETS),
                         ("allocation", ALLOCATIONS), ("objective", budget.OBJECTIVES),
                         ("svd", svd.METHODS)):
    value = md.get(field, _default(field))
    p.check(value in choices, f"{where}.{field}: expected one of {tuple(choices)}, got {value!r}")
  for field in ("data_aware", "sweep"):
    value = md.get(field, _default(field))
    p.check(isinstance(value, bool), f"{where}.{field}: expected true or false, got {value!r}")
  for field in ("calibration_batches", "recalibration_batches"):
    batches = md.get(field, _default(field))
    p.check(_is_int(batches) and batches >= 1,
            f"{where}.{field}: expected an int >= 1, got {batches!r}")
  recal = md.get("recalibrate", _default("recalibrate"))  # "no" is a truthy string.
  p.check(isinstance(recal, bool),
          f"{where}.recalibrate: expected true or false, got {type(recal).__name__} {recal!r}")
  key = md.get("init_key", _default("init_key"))
  p.check(key is None or (isinstance(key, str) and key.strip() != ""),
          f"{where}.init_key: expected the name of a method (whose key draws the gates) or "
          f"None, got {type(key).__name__} {key!r}")


def check_config(config) -> None:
  """Every field the experiment reads, checked at once.

  Raises:
    ConfigError: listing every offending field (``config.epochs: expected an int >= 1,
      got -1``), what was expected and what was given.
  """
  p = _Problems()
  for name, minimum in (("epochs", 1), ("batch_size", 1), ("seeds", 1), ("seed", 0),
                        ("checkpoint_every_steps", 0), ("log_every_steps", 0)):
    _int_at_least(p, config, name, minimum, default=0 if "every" in name else None)
  eval_bs = config.get("eval_batch_size")
  p.check(eval_bs is None or (_is_int(eval_bs) and eval_bs >= 0),
          f"config.eval_batch_size: expected an int >= 1 (0 or None: batch_size), got {eval_bs!r}")
  keep = config.get("keep_checkpoints", 2)
  p.check(keep is None or (_is_int(keep) and keep >= 1),
          f"config.keep_checkpoints: expected an int >= 1 or None (keep all), got {keep!r}: "
          "0 would delete every checkpoint")
  allow = config.get("allow_resume_changes", "")
  p.check(isinstance(allow, str), f"config.allow_resume_changes: expected a comma-separated "
                                  f"string of fingerprint fields, got {allow!r}")
  p.check(config.get("compute_dtype", "float32") in ("float32", "bfloat16", "float16"),
          f"config.compute_dtype: expected float32, bfloat16 or float16, got "
          f"{config.get('compute_dtype')!r}")
  _check_optimizer(p, "config.optimizer", config, None)
  tc = config.get("teacher")
  if p.check(tc is not None, "config.teacher: missing"):
    p.check(tc.get("model") in models.NAMES,
            f"config.teacher.model: unknown model {tc.get('model')!r}; known: "
            f"{', '.join(models.NAMES)}")
    if not tc.get("checkpoint"):
      p.check(_is_int(tc.get("epochs")) and tc.get("epochs") >= 1,
              f"config.teacher.epochs: expected an int >= 1, got {tc.get('epochs')!r}")
    if tc.get("optimizer"):
      _check_optimizer(p, "config.teacher.optimizer", config, tc.get("optimizer"))
  defs = config.get("method_defs") or {}
  names = [n.strip() for n in str(config.get("methods", "")).split(",") if n.strip()]
  p.check(bool(names), "config.methods: empty (a comma-separated list of config.method_defs)")
  unknown = [n for n in names if n not in defs]
  p.check(not unknown, f"config.methods names {unknown}, not defined in config.method_defs "
                       f"(defined: {sorted(defs)})")
  students = []
  for name in names:
    if name in defs:
      md = _dict(defs[name])
      _check_method(p, config, name, md, students)
      if md.get("kind") == "student":
        students.append(name)
  sweep = _dict(config.get("sweep"))
  for i, r in enumerate(sweep.get("ranks", ()) or ()):
    p.call(f"config.sweep.ranks[{i}]", parse_rank, r, f"config.sweep.ranks[{i}]")
  for i, h in enumerate(sweep.get("heads", ()) or ()):
    p.check(_is_int(h) and h >= 1, f"config.sweep.heads[{i}]: expected an int >= 1, got {h!r}")
  dc = config.get("data")
  if p.check(dc is not None, "config.data: missing (a data config with a name: "
                             f"one of {list(data_lib.NAMES)})"):
    p.call("config.data", data_lib.input_shape, dc)
  _raise(p)


def _raise(p: _Problems) -> None:
  if p:
    raise ConfigError("the config cannot run: " + "; ".join(p))


__all__ = ["ConfigError", "METHOD_FIELDS", "check_config", "parse_rank"]
