"""Small helpers shared across the package: atomic files, JSON, tree-path names.

* `atomic_write` writes a temp file next to the target, syncs it and renames it into
  place, so a run killed mid-write leaves the previous file (or none), never a
  truncated one: results, reports, exported weights and specs all go through it.
* `jsonable` / `write_json`: plain-Python copies of results that hold NumPy or jax
  values (scalars, arrays), tuples and non-string keys, written atomically.
* `path_name` / `flatten_with_names` / `map_with_names`: a leaf's ``"a/b/kernel"`` name,
  the form rules (`inhernet_jax.common.rules`), checkpoints and checksums all use.

Example:
  ```python
  write_json("results.json", {"accuracy": np.float32(0.9), "shape": (3, 3)}, indent=2)
  {name: x.shape for name, x in flatten_with_names(params)}   # {"conv/kernel": ...}
  ```
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import IO, Any

import jax
import numpy as np


# --------------------------------------------------------------------------- files
def _umask() -> int:
  """The process's umask (read from /proc without changing it where possible)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)  # Elsewhere: read by setting it, then restored at once.
  os.umask(mask)
  return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None],
                 mode: str = "wb") -> None:
  """Calls ``write(f)`` on a temp file beside ``path``, then renames it to ``path``.

  Args:
    path: the file to (re)place.
    write: writes the whole content to the open file it is given.
    mode: ``"wb"`` (bytes) or ``"w"`` (text, UTF-8).

  The temp file lives in ``path``'s directory so the rename stays on one filesystem;
  on any error it is removed and the error raised, and ``path`` is untouched.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                             suffix=".tmp")
  try:
    # mkstemp creates 0600; the file gets a new file's permissions (0666 less the umask).
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# ---------------------------------------------------------------------------- JSON
def jsonable(obj: Any, where: str = "value") -> Any:
  """Plain-Python copy of ``obj``: NumPy/jax scalars and arrays become numbers and
  (nested) lists, tuples lists, mapping keys strings; floats pass as they are (NaN and
  Inf included, which `json` writes as ``NaN``/``Infinity``).

  Raises:
    TypeError: naming the offending ``where[...]`` path, for any other type.
  """
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
  if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):  # jax.Array too.
    return np.asarray(obj).tolist()
  raise TypeError(f"{where}: {type(obj).__name__} is not JSON-serialisable")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
  """Writes `jsonable` ``(obj)`` as JSON to ``path`` atomically (UTF-8)."""
  where = os.path.basename(os.fspath(path))
  payload = json.dumps(jsonable(obj, where=where), indent=indent).encode("utf-8")
  atomic_write(path, lambda f: f.write(payload))


# ----------------------------------------------------------------------- tree paths
def path_name(path) -> str:
  """A `jax.tree_util` key path as ``"a/b/kernel"`` (dict keys, attributes, indices)."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def flatten_with_names(tree, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
  """``[(path_name, leaf)]`` of ``tree``, in `jax.tree.leaves` order."""
  return [(path_name(p), x) for p, x in jax.tree.flatten_with_path(tree, is_leaf=is_leaf)[0]]


def map_with_names(f: Callable[..., Any], tree, *rest) -> Any:
  """`jax.tree.map_with_path` with each leaf's `path_name`: ``f(name, leaf, *rest_leaves)``."""
  return jax.tree.map_with_path(lambda p, *xs: f(path_name(p), *xs), tree, *rest)
