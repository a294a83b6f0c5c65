"""Deprecated launcher names that moved: each old module forwards to its new home.

An old ``python -m launch.benchmark_scale ...`` runs the new program with the same
flags; an old ``from launch import benchmark_llama`` gets the new module itself. Both
warn (`DeprecationWarning`) and go away one release after the move.

Example (the whole of an old module)::

  from benchmarks import scale as _new
  from launch import _moved

  _moved.forward(__name__, "launch.benchmark_scale", _new)
"""

from __future__ import annotations

import sys
import types
import warnings


def forward(name: str, old: str, new: types.ModuleType) -> None:
  """Makes module ``name`` (the old module ``old``, or ``__main__`` when run) stand for ``new``."""
  warnings.warn(f"{old} moved to {new.__name__}: use `python -m {new.__name__}` or "
                f"`import {new.__name__}`", DeprecationWarning, stacklevel=2)
  if name != "__main__":
    sys.modules[name] = new
    return
  if not hasattr(new, "main"):  # A library module: running it did nothing before either.
    return
  from absl import app

  if hasattr(new, "_define_flags"):  # Programs that define their flags only when run.
    new._define_flags()
  app.run(new.main)
