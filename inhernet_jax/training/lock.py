"""One writer per workdir: an exclusive lock file, released on exit, stale ones taken over.

Two runs writing one workdir corrupt each other's checkpoints (or hang in orbax's
renames). `WorkdirLock` holds ``fcntl.flock`` on ``<workdir>/.lock``: the kernel drops it
when the process dies however it dies (SIGKILL included), so a lock file left behind by
a dead run is never an obstacle; its recorded pid and host are only used to say who
holds a live lock, or whose stale lock is taken over.

Example:
  ```python
  with lock.WorkdirLock("/tmp/run"):      # WorkdirBusy if another process holds it
    ...  # train, checkpoint
  ```
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from absl import logging

LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
  """Another live process is writing this workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process: alive.
    return True
  return True


def _read(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    data = json.loads(os.read(fd, 4096).decode() or "{}")
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


class WorkdirLock:
  """An exclusive, non-blocking lock on a directory (created if missing).

  Re-entrant within one process: a nested lock on the same directory (the experiment's
  workdir, then one of its runs) is a separate file, and the same directory locked twice
  by this process is allowed (counted).
  """

  _held: dict[str, tuple[int, int]] = {}  # realpath -> (fd, depth), this process's locks.

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.path.realpath(os.fspath(directory))
    self.path = os.path.join(self.directory, LOCK_FILE)

  def acquire(self) -> "WorkdirLock":
    held = self._held.get(self.directory)
    if held is not None:
      self._held[self.directory] = (held[0], held[1] + 1)
      return self
    os.makedirs(self.directory, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = _read(fd)
      os.close(fd)
      who = (f"pid {owner.get('pid')} on {owner.get('host')} (since {owner.get('since')})"
             if owner else "another process")
      raise WorkdirBusy(
          f"{self.directory} is in use by {who}: two runs must not write one workdir. Wait "
          f"for it to finish, stop it, or use another workdir") from None
    owner = _read(fd)
    if owner.get("pid") and owner.get("host") == socket.gethostname() and owner["pid"] != os.getpid():
      state = "still running, but not holding it" if _alive(int(owner["pid"])) else "gone"
      logging.warning("%s: taking over the stale lock of pid %s (%s)", self.directory,
                      owner["pid"], state)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    self._held[self.directory] = (fd, 1)
    return self

  def release(self) -> None:
    held = self._held.get(self.directory)
    if held is None:
      return
    fd, depth = held
    if depth > 1:
      self._held[self.directory] = (fd, depth - 1)
      return
    del self._held[self.directory]
    try:
      os.ftruncate(fd, 0)  # No owner recorded: nothing stale is left behind.
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


__all__ = ["LOCK_FILE", "WorkdirBusy", "WorkdirLock"]
