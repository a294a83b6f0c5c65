"""Files written whole or not at all.

`atomic_write` writes a temp file next to the target, syncs it and renames it into
place, so a run killed mid-write leaves the previous file (or none), never a truncated
one: results, reports, exported weights and specs all go through it.

Example::

  atomic_write("results.json", lambda f: json.dump(results, f, indent=2), mode="w")
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO, Any


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
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
