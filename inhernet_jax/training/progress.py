"""Progress bars that log lines do not break.

While a `bar` is open, log records (absl's handler, any ``logging.StreamHandler`` on
stderr, and anything else written to ``sys.stderr``) go through ``tqdm.write``: each
line is printed above the bar, which is redrawn below it, instead of being glued to the
bar's half-drawn line. Closing the (last) bar restores every stream. A disabled bar
(``disable=True``) changes nothing.

Example:
  ```python
  bar = progress.bar(total=steps, desc="inhernet")
  for step in range(steps):
    ...
    logging.info("epoch %d done", epoch)   # printed above the bar
    bar.update(1)
  bar.close()                              # logging writes to stderr directly again
  ```
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from tqdm import auto as tqdm_auto
from tqdm import std as tqdm_std


class _TqdmStream:
  """A text stream writing whole lines through ``tqdm.write`` (above the bars)."""

  def __init__(self, stream):
    self.stream = stream
    self._partial = ""
    self._lock = threading.Lock()

  def write(self, text: str) -> int:
    with self._lock:
      lines, newline, self._partial = (self._partial + text).rpartition("\n")
      if newline:
        tqdm_std.tqdm.write(lines, file=self.stream)
    return len(text)

  def flush(self) -> None:
    with self._lock:
      if self._partial:
        tqdm_std.tqdm.write(self._partial, file=self.stream, end="")
        self._partial = ""
    self.stream.flush()

  def isatty(self) -> bool:
    return self.stream.isatty()

  def __getattr__(self, name: str) -> Any:  # encoding, fileno, ...
    return getattr(self.stream, name)


_lock = threading.RLock()
_depth = 0
_restore: list[tuple[Any, str, Any]] = []  # (object, attribute, original value)


def _handlers():
  """The stream handlers log records reach by default (absl's python handler included)."""
  seen = []
  for logger in (logging.getLogger(), logging.getLogger("absl")):
    for h in logger.handlers:
      h = getattr(h, "python_handler", h)  # absl.logging.ABSLHandler wraps a StreamHandler.
      if isinstance(h, logging.StreamHandler) and h not in seen:
        seen.append(h)
  return seen


def _redirect() -> None:
  global _depth
  with _lock:
    _depth += 1
    if _depth > 1:
      return
    stderr = sys.stderr
    proxy = _TqdmStream(stderr)
    _restore.append((sys, "stderr", stderr))
    sys.stderr = proxy
    for h in _handlers():
      if h.stream is stderr:
        _restore.append((h, "stream", h.stream))
        h.stream = proxy


def _unredirect() -> None:
  global _depth
  with _lock:
    if _depth == 0:
      return
    _depth -= 1
    if _depth:
      return
    proxy = sys.stderr
    while _restore:
      obj, attr, value = _restore.pop()
      if getattr(obj, attr) is proxy:  # Someone else's replacement stays.
        setattr(obj, attr, value)
    if isinstance(proxy, _TqdmStream):
      proxy.flush()


def original_stderr():
  """``sys.stderr`` as it was before any bar redirected it."""
  return sys.stderr.stream if isinstance(sys.stderr, _TqdmStream) else sys.stderr


class _Bar(tqdm_auto.tqdm):
  """``tqdm.auto.tqdm`` that routes logging above itself while open."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("file", original_stderr())  # Never the proxy: bars draw directly.
    super().__init__(*args, **kwargs)
    self._redirected = not self.disable
    if self._redirected:
      _redirect()

  def close(self):
    try:
      super().close()
    finally:
      if getattr(self, "_redirected", False):
        self._redirected = False
        _unredirect()


def bar(*args, **kwargs) -> tqdm_auto.tqdm:
  """A ``tqdm.auto.tqdm`` (same arguments) during which log lines print above it.

  Its line shows the count, rate and ETA (tqdm's default format). Close it (or use it
  as a context manager / exhaust its iterable) to restore the streams; bars nest.
  """
  return _Bar(*args, **kwargs)
