"""Deprecated: `atomic_write` moved to `inhernet_jax.utils` (kept here for one release)."""

from __future__ import annotations

import warnings
from typing import Any

from inhernet_jax import utils


def __getattr__(name: str) -> Any:
  if name == "atomic_write":
    warnings.warn("inhernet_jax.files.atomic_write is deprecated; use "
                  "inhernet_jax.utils.atomic_write", DeprecationWarning, stacklevel=2)
    return utils.atomic_write
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
