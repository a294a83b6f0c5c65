"""One writer per workdir: `inhernet_jax.training.lock`, and the trainer refusing a second writer."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from inhernet_jax.training import lock

ROOT = pathlib.Path(__file__).parents[1]
_HOLD = ("import sys, time; from inhernet_jax.training import lock; "
         "l = lock.WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); "
         "time.sleep(60)")


def _holder(directory):
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(lock.WorkdirBusy, match=f"pid {proc.pid}"):
      lock.WorkdirLock(tmp_path).acquire()
  finally:
    proc.kill()
    proc.wait()
  # The holder was killed (SIGKILL: no clean-up): its lock is stale and taken over.
  with lock.WorkdirLock(tmp_path):
    assert f'"pid": {os.getpid()}' in (tmp_path / lock.LOCK_FILE).read_text()
  assert (tmp_path / lock.LOCK_FILE).read_text() == ""  # Released on exit.


def test_reentrant_in_one_process(tmp_path):
  with lock.WorkdirLock(tmp_path):
    with lock.WorkdirLock(tmp_path):
      pass
    assert (tmp_path / lock.LOCK_FILE).read_text()  # Still held by the outer one.


def test_two_concurrent_experiments_one_refused(tmp_path):
  """Two `launch.main` on one workdir: the second stops at once with one line."""
  # Enough epochs that the first run still holds the lock when the second starts (with a
  # warm compilation cache two epochs of digits end before a second process is up).
  cmd = [sys.executable, "-m", "launch.main", "--config=configs/digits.py:local",
         "--config.methods=student", "--config.epochs=500", f"--workdir={tmp_path}"]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while not (tmp_path / lock.LOCK_FILE).exists() or not (tmp_path / lock.LOCK_FILE).read_text():
      assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
      time.sleep(0.05)
    # Stopped, it still holds the lock, and leaves both cores to the second run.
    first.send_signal(signal.SIGSTOP)
    t0 = time.time()
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1, second.stderr
    assert "in use by pid" in second.stderr and "Traceback" not in second.stderr
    assert time.time() - t0 < 60
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
