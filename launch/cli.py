"""Command-line errors as one clear line (no traceback) for the launchers.

`run` replaces ``absl.app.run`` in every launcher: flags are parsed by `parse` (``--help``
shows the command's own flags and exits 0; a bad or missing flag, a config file that
fails to load, an unknown ``--config.<field>`` is ``error: ...``, before anything is
logged), and ``main`` runs inside `guarded` (the library's expected failures, a full
disk or a read-only directory, a missing optional package: one ``error:`` line, exit 1;
Ctrl-C: one line with the command's resume hint, exit 130; anything else is a bug and
keeps its traceback, behind a line saying so). `load_config` turns ml_collections'
deferred config-file failure into ``error: --config=...: no such config file``.

Example:
  ```python
  def main(argv):
    config = cli.load_config(_CONFIG)
    ...

  if __name__ == "__main__":
    cli.run(main, interrupted="run the same command again to resume")
  ```
"""

import contextlib
import difflib
import errno
import functools
import logging as pylogging
import os
import re
import sys

from absl import app, flags

from inhernet_jax.experiment import validate
from inhernet_jax.interop import convert
from inhernet_jax.training import checkpoint
from inhernet_jax.training import lock

EXPECTED = (app.UsageError, validate.ConfigError, checkpoint.CheckpointError, lock.WorkdirBusy,
            convert.ConversionError, OSError)
# --heads of every launcher (inherit, convert, inherit_effnet): the paper's CIFAR setting.
DEFAULT_HEADS = 3
HELP = ("--help", "-help", "--helpshort", "-helpshort", "-h", "-?")
# Optional modules -> the extra that installs them (pyproject.toml).
EXTRAS = {"tensorflow_datasets": "data", "array_record": "data", "torch": "torch",
          "transformers": "torch", "efficientnet_lite_pytorch": "torch"}
_TYPE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit)(?:\(\w*\))?: ")
# A write that failed for want of room or rights: the condition, not a bug.
_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)
# TensorStore (orbax's array writer) reports a failed write(2) as a ValueError whose text
# ends in "... No space left on device [os_error_code='28']" (no errno attribute).
_TS_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")
_TS_PATH = re.compile(r'Failed (?:writing|to write|to open|to create)[^"]*"([^"]+)"')


def one_line(text: str) -> str:
  """``text`` on one line: its non-empty lines joined with ``; ``."""
  return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def fail(message: str, code: int = 1):
  """Prints ``error: message`` (one line) to stderr and exits with status ``code``."""
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(code)


def _os_error(e: OSError) -> str:
  where = e.filename if e.filename is not None else None
  what = e.strerror or str(e)
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    what += " (free some space, then run the same command again: finished steps are kept)"
  elif e.errno == errno.EFBIG:
    what += (" (a file-size limit, see ulimit -f: raise it, then run the same command again: "
             "finished steps are kept)")
  elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    what += " (expected a directory this user can write: choose another)"
  return f"{where}: {what}" if where is not None else what


def _cause(e: BaseException, kinds) -> BaseException | None:
  """The first exception of ``kinds`` in ``e``'s chain (libraries wrap OSErrors)."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, kinds):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    yield e
    seen.add(id(e))
    e = e.__cause__ or e.__context__


def disk_error(e: BaseException) -> OSError | None:
  """The failed write behind ``e`` when it failed for want of room or rights (a full
  disk, a quota, a file-size limit, a read-only or forbidden directory), as an OSError;
  also when TensorStore reported it only in its text. None otherwise."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in _DISK:
      return x
    code = _TS_CODE.search(str(x)) if isinstance(x, (ValueError, RuntimeError)) else None
    if code and int(code.group(1)) in _DISK:
      path = _TS_PATH.search(str(x))
      n = int(code.group(1))
      return OSError(n, os.strerror(n), path.group(1) if path else None)
  return None


def message(e: BaseException) -> str | None:
  """The one-line message of an expected failure ``e`` (None for a bug)."""
  missing = _cause(e, ModuleNotFoundError)
  if missing is not None and (missing.name or "").split(".")[0] in EXTRAS:
    top = missing.name.split(".")[0]
    return (f"the optional package {top!r} is not installed; install the extra: "
            f"pip install 'inhernet-jax[{EXTRAS[top]}]'")
  if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, FileExistsError)):
    return _os_error(e)
  if isinstance(e, EXPECTED):
    return one_line(str(e)) or type(e).__name__
  disk = disk_error(e)
  if disk is not None:
    return _os_error(disk)
  return None


@contextlib.contextmanager
def quiet():
  """Logging held back inside the block (the checks before any work: JAX's backend
  probing, a dataset library's warning about a folder it probed, would otherwise come
  before their one-line error): INFO is dropped; warnings and errors are printed after the
  block when it ends normally, and dropped with it when it raises (its error is the line
  that says what is wrong)."""
  root = pylogging.getLogger()
  level = root.level
  handlers = list(root.handlers)
  held = []

  def hold(record):
    held.append(record)
    return False

  for handler in handlers:
    handler.addFilter(hold)
  root.setLevel(max(level, pylogging.WARNING))
  ended = False
  try:
    yield
    ended = True
  finally:
    root.setLevel(level)
    for handler in handlers:
      handler.removeFilter(hold)
    if ended:
      seen = set()
      for record in held:  # A record reaches each handler once: held once per handler.
        if id(record) not in seen and record.levelno >= pylogging.WARNING:
          seen.add(id(record))
          root.handle(record)


@contextlib.contextmanager
def errors(expected=EXPECTED):
  """Expected failures inside the block exit with ``error: <message>`` (status 1)."""
  try:
    yield
  except expected as e:
    fail(message(e) or one_line(str(e)))


def _not_orbax_disk_error(record: pylogging.LogRecord) -> bool:
  """False for orbax's own log of a failed write for want of room or rights (each of its
  save threads logs it with a traceback): orbax raises the same error to its caller, which
  `guarded` prints as the command's one ``error:`` line."""
  exc = record.exc_info[1] if record.exc_info else None
  return not (exc is not None and f"{os.sep}orbax{os.sep}" in record.pathname
              and disk_error(exc) is not None)


def guarded(main, argv, *, interrupted: str = "stopped"):
  """``main(argv)``: an expected failure is one ``error:`` line (exit 1), Ctrl-C one line
  with the ``interrupted`` hint (exit 130), a bug a line saying so and its traceback."""
  absl_logger = pylogging.getLogger("absl")
  absl_logger.addFilter(_not_orbax_disk_error)
  try:
    return main(argv)
  except KeyboardInterrupt:
    print(f"interrupted: {interrupted}", file=sys.stderr, flush=True)
    sys.exit(130)
  except SystemExit:
    raise
  except BaseException as e:  # noqa: BLE001 (sorted below: expected or a bug)
    text = message(e)
    if text is not None:
      fail(text)
    print(f"error: internal error ({type(e).__name__}), a bug: please report it with the "
          "traceback below", file=sys.stderr, flush=True)
    raise
  finally:
    absl_logger.removeFilter(_not_orbax_disk_error)


def help_text(module: str | None = None) -> str:
  """The command's description and its own flags (``module``'s key flags)."""
  doc = (sys.modules["__main__"].__doc__ or "").strip()
  own = flags.FLAGS.module_help(module or sys.argv[0]).strip("\n")
  return f"{doc}\n\nflags:\n\n{own}\n\nTry --helpfull to get a list of all flags."


def _no_field(head: str, part: str, near) -> str:
  return (f"{head}: the config has no field {part!r}"
          + (f" (did you mean {near[0]!r}?)" if near else "")
          + "; expected a field of the config file (see it for the fields)")


def _flag_error(argv, e: BaseException) -> str:
  text = str(e)
  required = re.search(r"[Ff]lag --(\w+) must have a value other than None", text)
  if required:
    name = required.group(1)
    return f"--{name} is required: {flags.FLAGS[name].help}"
  for arg in argv[1:]:  # --config.<field>=...: name the field and what is there.
    head = arg.split("=", 1)[0]
    name, _, path = head.lstrip("-").partition(".")
    if not path or name not in flags.FLAGS:
      continue
    try:
      node = flags.FLAGS[name].value
      node.keys()
    except Exception:  # noqa: BLE001 (not loaded: ml_collections' message names the field)
      node = None
    unknown = isinstance(e, (KeyError, AttributeError)) or "Unknown command line flag" in text
    for part in path.split("."):
      if node is None:
        if unknown and re.search(rf"\b{re.escape(part)}\b", text):
          near = re.search(r'Did you mean "([^"]+)"', text)
          return _no_field(head, part, [near.group(1)] if near else [])
        continue
      try:
        keys = list(node.keys())
      except AttributeError:
        break
      if part not in keys:
        return _no_field(head, part, difflib.get_close_matches(part, keys, n=1))
      node = node[part]
  cause = e.__cause__ or e
  lines = [l.strip() for l in str(cause).splitlines() if l.strip()]
  if lines and lines[0].startswith("flag --") and len(lines) > 1 and "Traceback" in str(cause):
    return f"{lines[0].split(': ', 1)[0][5:]}: {_TYPE.sub('', lines[-1])}"
  return one_line(_TYPE.sub("", text)).removeprefix("flag ") or type(e).__name__


def parse(argv, module: str | None = None):
  """absl's flag parsing, with ``--help`` exiting 0 after the command's own flags and
  every flag error one ``error:`` line (exit 1)."""
  args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if any(a in HELP for a in args):
    print(help_text(module))
    sys.exit(0)
  if any(a in ("--helpfull", "-helpfull") for a in args):
    print(help_text(module))
    print(flags.FLAGS.get_help())
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except SystemExit:
    raise
  except Exception as e:  # noqa: BLE001 (flags.Error, or a config override that raised)
    fail(_flag_error(argv, e))


def run(main, *, interrupted: str = "stopped", module: str | None = None) -> None:
  """``absl.app.run(main)`` with `parse` and `guarded` (see the module docstring)."""
  app.run(functools.partial(guarded, main, interrupted=interrupted),
          flags_parser=functools.partial(parse, module=module))


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
    fail(f"--{name}={spec}: {_TYPE.sub('', lines[-1]) if lines else type(e).__name__}")
