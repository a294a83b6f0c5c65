"""`inhernet_jax.training.progress`: log lines go above an open bar, streams come back after."""

import io
import logging
import os
import pathlib
import subprocess
import sys

from inhernet_jax.training import progress

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Terminal(io.StringIO):
  def isatty(self):
    return False


def _line_starts(text: str, fragment: str) -> bool:
  """Whether ``fragment`` starts a line (after a newline or a carriage return)."""
  i = text.index(fragment)
  return i == 0 or text[i - 1] in "\r\n"


def _setup(monkeypatch):
  err = _Terminal()
  monkeypatch.setattr(sys, "stderr", err)
  handler = logging.StreamHandler(err)
  logger = logging.getLogger()
  logger.addHandler(handler)
  return err, handler, logger


def test_log_line_goes_above_the_bar(monkeypatch):
  err, handler, logger = _setup(monkeypatch)
  writes = []
  real_write = progress.tqdm_std.tqdm.write
  monkeypatch.setattr(progress.tqdm_std.tqdm, "write",
                      classmethod(lambda cls, s, **kw: (writes.append(s), real_write(s, **kw))))
  try:
    bar = progress.bar(total=10, desc="train", mininterval=0, ncols=60)
    bar.update(3)
    logging.getLogger("t").warning("epoch 1 done")
    bar.update(1)
    bar.close()
    logging.getLogger("t").warning("after")
  finally:
    logger.removeHandler(handler)
  text = err.getvalue()
  assert writes == ["epoch 1 done"]  # Through tqdm.write while shown; directly after.
  assert "train:  30%" in text and _line_starts(text, "epoch 1 done"), repr(text)
  # The bar is redrawn after the log line (at 30%, then 40%).
  assert text.index("train:  40%") > text.index("epoch 1 done"), repr(text)
  assert sys.stderr is err and handler.stream is err


def test_without_the_redirect_the_line_breaks_the_bar(monkeypatch):
  """What the bar fixes: a plain tqdm bar and a log line on one line."""
  err, handler, logger = _setup(monkeypatch)
  try:
    bar = progress.tqdm_std.tqdm(total=10, desc="train", mininterval=0, ncols=60, file=err)
    bar.update(3)
    logging.getLogger("t").warning("epoch 1 done")
    bar.close()
  finally:
    logger.removeHandler(handler)
  assert not _line_starts(err.getvalue(), "epoch 1 done")


def test_plain_stderr_writes_are_whole_lines(monkeypatch):
  err, handler, logger = _setup(monkeypatch)
  logger.removeHandler(handler)
  with progress.bar(total=5, desc="run", mininterval=0, ncols=60) as bar:
    bar.update(2)
    print("partial ", end="", file=sys.stderr)
    print("line", file=sys.stderr)
  text = err.getvalue()
  assert _line_starts(text, "partial line"), repr(text)
  assert sys.stderr is err


_ABSL_PROGRAM = """
from absl import app, logging
from inhernet_jax.training import progress

def main(argv):
  bar = progress.bar(total=4, desc="train", mininterval=0, ncols=60)
  bar.update(1)
  logging.info("epoch 1 done")
  bar.update(1)
  bar.close()
  logging.info("after the bar")

app.run(main)
"""


def test_absl_logging_under_app_run(tmp_path):
  """absl's own handler (installed by app.run), with and without --logtostderr."""
  for extra in ([], ["--logtostderr"]):
    proc = subprocess.run([sys.executable, "-c", _ABSL_PROGRAM, *extra], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.replace("\r", "\n").splitlines()
    logged = [l for l in lines if "epoch 1 done" in l]
    assert len(logged) == 1 and "train:" not in logged[0], proc.stderr  # Its own line.
    assert "] epoch 1 done" in logged[0], logged  # absl's format (I1129 ... file:line]).
    assert sum("after the bar" in l for l in lines) == 1, proc.stderr


def test_nested_bars_restore_once_and_disabled_bar_changes_nothing(monkeypatch):
  err, handler, logger = _setup(monkeypatch)
  try:
    with progress.bar(total=2, disable=True):
      assert sys.stderr is err and handler.stream is err
    outer = progress.bar(total=2, mininterval=0)
    inner = progress.bar(total=2, mininterval=0)
    assert inner.fp == err  # Bars draw on the real stream, not through the proxy.
    inner.close()
    assert sys.stderr is not err and handler.stream is sys.stderr
    outer.close()
    outer.close()  # Closing twice restores nothing twice.
    assert sys.stderr is err and handler.stream is err
  finally:
    logger.removeHandler(handler)
