"""Command-line errors as one clear line (no traceback) for the launchers.

`load_config` turns ml_collections' deferred config-file failure (a missing file, a bad
``file.py:arg``) into ``error: --config=...: no such file``; `errors` does the same for
the library's expected failures (a bad config, a checkpoint of another run, a busy
workdir, unreadable weights), exiting with status 1. Bugs keep their tracebacks.

Example:
  ```python
  def main(argv):
    with cli.errors():
      config = cli.load_config(_CONFIG)
      ...
  ```
"""

import contextlib
import os
import sys

from absl import app, flags

from inhernet_jax.training import checkpoint
from inhernet_jax.interop import convert
from inhernet_jax.training import lock
from inhernet_jax.experiment import validate

EXPECTED = (app.UsageError, validate.ConfigError, checkpoint.CheckpointError, lock.WorkdirBusy,
            convert.ConversionError, FileNotFoundError, FileExistsError)


def fail(message: str) -> None:
  """Prints ``error: message`` to stderr and exits with status 1."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def load_config(holder, name: str = "config"):
  """The config of a ``DEFINE_config_file`` flag, or a one-line error saying why not."""
  try:
    config = holder.value
    config.keys()  # A failed load is a placeholder that raises on any use.
    return config
  except OSError as e:
    spec = flags.FLAGS[name].serialize().split("=", 1)[-1]
    path = spec.split(":", 1)[0]
    if path and not os.path.isfile(path):
      fail(f"--{name}={spec}: no such config file ({os.path.abspath(path)})")
    cause = e.__cause__ or e
    lines = [l.strip() for l in str(cause).splitlines() if l.strip()]
    fail(f"--{name}={spec}: {lines[-1] if lines else type(e).__name__}")


@contextlib.contextmanager
def errors(expected=EXPECTED):
  """Expected failures inside the block exit with ``error: <message>`` (status 1)."""
  try:
    yield
  except expected as e:
    fail(str(e))
