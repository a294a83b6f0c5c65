"""Sizes by name: the one reader of the strings that stand for a parameter count.

A size is a number or a name, and each word has one meaning:

* ``"student:<zoo model>"``: that zoo model's parameter count (`models.param_count`,
  with the task's ``num_classes`` and the model's own fields, ``model_kwargs``);
* ``"params:<method>"``: the parameter count of another method of the same experiment
  config (a student trained before it); ``methods`` maps their names to their counts.

The launch layer (`experiment`, ``launch.spec_flags``) reads sizes here and hands the
library numbers: `budget` and `accounting` take parameter counts and fractions, and know
no model by name.

Example:
  ```python
  target = sizes.parameter_budget(teacher_params, "student:resnet8x4", num_classes=100)
  spec = budget.allocate(teacher_params, target, heads=3, rules=rules)
  sizes.named_size("params:student", methods={"student": 1_233_540})   # 1233540
  sizes.named_size(0.25)                                              # None: a number
  ```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inhernet_jax import models
from inhernet_jax.decomposition import accounting

KINDS = ("student", "params")
EXPECTED = "an int, a fraction in (0, 1], 'student:<zoo model>' or 'params:<method>'"


def is_name(size: Any) -> bool:
  """Whether ``size`` is a named size (a string ``"<kind>:<name>"``), not a number."""
  return isinstance(size, str) and ":" in size


def named_size(size: Any, *, methods: Mapping[str, int] | None = None,
               num_classes: int | None = None, model_kwargs: Mapping[str, Any] | None = None,
               where: str = "size") -> int | None:
  """The parameter count a named size stands for; None when ``size`` is not a name.

  Args:
    size: ``"student:<zoo model>"`` or ``"params:<method>"``; anything else (an int, a
      float, a string of a number) is the caller's to read, and gives None.
    methods: method name -> its parameter count, for ``"params:<method>"`` (an experiment
      config's methods run so far). None where there are none (command lines).
    num_classes: classifier size of a ``"student:"`` model (its default when None).
    model_kwargs: fields of a ``"student:"`` model (``{"widths": (16, 32, 64)}``).
    where: what ``size`` is, to start error messages (``"--rank"``, a config field).

  Raises:
    ValueError: an unknown kind, zoo model or method, naming ``where``, the value and
      what was expected (the known models or methods).
  """
  if not is_name(size):
    return None
  kind, _, name = size.strip().partition(":")
  kind, name = kind.strip(), name.strip()
  if kind not in KINDS:
    raise ValueError(f"{where} {size!r}: expected {EXPECTED}")
  if kind == "params":
    if methods is None:
      raise ValueError(f"{where} {size!r}: 'params:<method>' is the size of another method of "
                       "an experiment config, and none is known here; for a zoo model's size "
                       f"write 'student:<zoo model>' (known: {', '.join(models.NAMES)})")
    if name not in methods:
      raise ValueError(f"{where} {size!r}: unknown method {name!r} ('params:<method>' is the "
                       f"size of another method run before it); known: "
                       f"{', '.join(sorted(methods)) or 'none'}")
    return int(methods[name])
  if name not in models.NAMES:
    raise ValueError(f"{where} {size!r}: unknown model {name!r}; known: {', '.join(models.NAMES)}")
  return int(models.param_count(name, num_classes=num_classes, **dict(model_kwargs or {})))


def parameter_budget(teacher_params, size, *, num_classes: int | None = None,
                     model_kwargs: Mapping[str, Any] | None = None,
                     methods: Mapping[str, int] | None = None, where: str = "budget") -> int:
  """A total parameter count for the whole inherited network.

  Args:
    teacher_params: the teacher's ``params`` (arrays or `jax.ShapeDtypeStruct`s).
    size: an int (parameters, every leaf counted); a float in (0, 1] (that fraction of
      the teacher's parameters, rounded down); a string of either (command lines),
      `accounting.budget_params`; or a name, ``"student:<zoo model>"`` /
      ``"params:<method>"`` (`named_size`).
    num_classes: classifier size of a ``"student:"`` model (its default when None).
    model_kwargs: fields of a ``"student:"`` model (``{"widths": (16, 32, 64)}``).
    methods: method name -> parameter count, for ``"params:<method>"``.
    where: what ``size`` is, to start error messages.

  Raises:
    TypeError: a size of the wrong type, named with what was expected.
    ValueError: a size out of range, or a name of an unknown kind, model or method.
  """
  count = named_size(size, methods=methods, num_classes=num_classes,
                     model_kwargs=model_kwargs, where=where)
  if count is None:
    count = accounting.budget_params(teacher_params, size, where=where, expected=EXPECTED)
  return count
