"""Orbax's event loops end with their tasks: no late tracebacks after a failed restore.

Orbax runs each read or write in a fresh asyncio loop (``asyncio_utils.run_sync``) that it
closes as soon as the main coroutine returns or raises, without cancelling the tasks
still running. When one array of a checkpoint cannot be read (a damaged or missing file,
its ``array_metadatas``), the restore fails at once while TensorStore still reads the
other arrays; each of those reads then finishes into the closed loop, and Python prints
``RuntimeError: Event loop is closed`` (TensorStore's callback, through
``sys.unraisablehook``) or ``Task exception was never retrieved`` (the asyncio logger),
dozens of tracebacks after the one error that was reported (and recovered from:
`checkpoint.restore_latest` falls back to the step before).

`install` makes orbax's loop end the way ``asyncio.run`` ends one: the tasks still
pending are cancelled and awaited (their results or errors collected: the run they
belonged to has already failed with its own error, which propagates unchanged), then the
loop is closed. It replaces ``orbax.checkpoint._src.asyncio_utils._run_sync_via_new_loop``
(orbax 0.12: a private function; other orbax versions without it are left alone).
Draining leaves one race: a read that completes while its task is being cancelled still
calls into the loop after it closed. That one error, of exactly this form (a
``RuntimeError('Event loop is closed')`` raised by asyncio's ``call_soon_threadsafe``
called from C, reported with no object), is not printed (`late_read`); every other
unraisable error goes on to the hook that was installed before.

Example:
  ```python
  from inhernet_jax.training import teardown
  teardown.install()   # idempotent; `inhernet_jax.training.checkpoint` calls it (each restore)
  ```
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import traceback
from typing import Any, Coroutine, Iterator

_PATCHED = "_inhernet_drains_tasks"
_BASE_EVENTS = os.path.join("asyncio", "base_events.py")


def late_read(unraisable) -> bool:
  """Whether ``unraisable`` (``sys.unraisablehook``'s argument) is a read that finished
  into its closed loop: ``RuntimeError('Event loop is closed')`` from asyncio's
  ``call_soon_threadsafe`` called from C (TensorStore's completion callback)."""
  if (unraisable.object is not None or unraisable.exc_type is not RuntimeError
      or str(unraisable.exc_value) != "Event loop is closed"):
    return False
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return (bool(frames) and frames[0].name == "call_soon_threadsafe"
          and frames[0].filename.endswith(_BASE_EVENTS))


class _Hook:
  """``sys.unraisablehook`` without `late_read` errors; the rest to ``previous``."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable):
    if not late_read(unraisable):
      self.previous(unraisable)


def run_until_complete_and_drain(coro: Coroutine[Any, Any, Any]) -> Any:
  """``coro``'s result in a fresh loop; then its leftover tasks cancelled and awaited,
  and the loop closed (``asyncio.run``'s ending, without making the loop current for
  longer than the call)."""
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  except BaseException:
    # The run failed and that error propagates; sibling tasks that had already failed
    # (done, so not among the tasks `_drain` awaits) are the same failure: not logged
    # again as "never retrieved" when they are collected.
    loop.set_exception_handler(_sibling_failures_quiet)
    raise
  finally:
    try:
      _drain(loop)
    except Exception:  # noqa: BLE001 - the run's own result or error is what propagates.
      pass
    finally:
      asyncio.set_event_loop(None)
      loop.close()


def _sibling_failures_quiet(loop: asyncio.AbstractEventLoop, context: dict) -> None:
  if context.get("message") == "Task exception was never retrieved":
    return
  loop.default_exception_handler(context)


def _drain(loop: asyncio.AbstractEventLoop) -> None:
  pending = asyncio.all_tasks(loop)
  if not pending:
    return
  for task in pending:
    task.cancel()
  # return_exceptions: every task's outcome is retrieved here (none is left to be logged
  # as "never retrieved" when it is collected).
  loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def install() -> bool:
  """Makes orbax's ``run_sync`` loops drain their tasks (`run_until_complete_and_drain`)
  and ``sys.unraisablehook`` skip `late_read` errors (wrapping the hook installed now, once).
  True when orbax has the function replaced (now or before), False when it has none."""
  if not isinstance(sys.unraisablehook, _Hook):
    sys.unraisablehook = _Hook(sys.unraisablehook)
  try:
    from orbax.checkpoint._src import asyncio_utils
  except ImportError:  # pragma: no cover (another orbax layout)
    return False
  current = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
  if current is None:
    return False
  if not getattr(current, _PATCHED, False):
    setattr(run_until_complete_and_drain, _PATCHED, True)
    asyncio_utils._run_sync_via_new_loop = run_until_complete_and_drain
  return True


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
  """Ctrl-C (SIGINT) held back while the block runs, then raised as ``KeyboardInterrupt``.

  For a checkpoint being written: a ``KeyboardInterrupt`` inside orbax's wait for its save
  thread is logged by orbax with a traceback, and leaves that thread committing while the
  interpreter shuts down (it then fails, "cannot schedule new futures after shutdown",
  with another traceback), the step half written. Held back, the save completes and the
  interrupt follows it; a second Ctrl-C interrupts at once (a save that hangs). Only the
  main thread receives signals; elsewhere the block runs as it is.

  Example:
    ```python
    with teardown.ctrl_c_deferred():
      mngr.wait_until_finished()
    ```
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  caught = []

  def hold(signum, frame):
    if caught:
      raise KeyboardInterrupt
    caught.append(signum)

  previous = signal.signal(signal.SIGINT, hold)
  try:
    yield
  finally:
    # None: a handler not set from Python (the default one); SIG_DFL restores it.
    signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
  if caught:
    raise KeyboardInterrupt


__all__ = ["ctrl_c_deferred", "install", "late_read", "run_until_complete_and_drain"]
