"""The console commands ``inhernet-train``, ``inhernet-inherit``, ``inhernet-convert``,
``inhernet-compare-init``, ``inhernet-inherit-effnet`` and ``inhernet-sentence-distill``.

Each runs a launcher of ``launch/`` (``python -m launch.main``, ``launch.inherit``,
``launch.convert``, ``launch.compare_init``, ``launch.inherit_effnet``,
``launch.sentence_distill``) with the same absl flags. The launchers stay in the checkout's
``launch/``; a command finds its launcher:

* in a checkout (a clone, an editable install): the ``launch/`` next to this package,
  imported as ``launch.<name>`` with the checkout first on ``sys.path`` (what ``python
  -m`` from the checkout gives), so the command and ``import inhernet_jax`` use one tree;
* installed from a wheel: the copy of those launchers the wheel ships as the private
  ``inhernet_jax._launch`` (pyproject.toml maps them there; no top-level ``launch``).

A config given by path may import its own package (``from configs import common``)
from any directory: its package root goes last on ``sys.path``.

Example:
  ```bash
  inhernet-train --config=configs/digits.py --workdir=workdir/digits
  inhernet-inherit --config=configs/digits.py --teacher=RUN --rank=8 --out=/tmp/inh
  ```
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launcher(name: str) -> ModuleType:
  """The launcher module ``name`` (``main``, ``inherit``, ``convert``), imported (which
  defines its flags): the checkout's ``launch/<name>.py`` if this package sits in a
  checkout, else the wheel's ``inhernet_jax._launch.<name>``."""
  if all(os.path.isfile(os.path.join(_ROOT, "launch", f)) for f in ("__init__.py", f"{name}.py")):
    if _ROOT not in sys.path:
      sys.path.insert(0, _ROOT)
    return importlib.import_module(f"launch.{name}")
  try:
    return importlib.import_module(f"inhernet_jax._launch.{name}")
  except ModuleNotFoundError as e:
    if not (e.name or "").startswith("inhernet_jax._launch"):
      raise
    raise SystemExit(f"error: the launcher {name!r} is neither in a checkout next to "
                     f"{os.path.dirname(os.path.abspath(__file__))} (launch/{name}.py) nor "
                     "installed (inhernet_jax._launch); reinstall inhernet-jax") from None


def config_roots(argv: Sequence[str], names: Sequence[str] = ("config",)) -> Iterator[str]:
  """Directories holding the package of each config file given by path in ``argv``.

  ``--config=repo/configs/digits.py:local`` yields ``repo`` when ``repo/configs`` is a
  package (an ``__init__.py``), so the config's ``from configs import common`` imports;
  a config outside a package, or a missing file, yields nothing.
  """
  for i, arg in enumerate(argv):
    for name in names:
      if arg.startswith(f"--{name}="):
        spec = arg.split("=", 1)[1]
      elif arg == f"--{name}" and i + 1 < len(argv):
        spec = argv[i + 1]
      else:
        continue
      path = os.path.abspath(spec.split(":", 1)[0])
      directory = os.path.dirname(path)
      if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, "__init__.py")):
        continue
      while os.path.isfile(os.path.join(directory, "__init__.py")):
        directory = os.path.dirname(directory)
      yield directory


def run(name: str) -> None:
  """Runs launcher ``name``'s absl ``main`` on ``sys.argv`` (``launch.cli.run``: one-line
  errors); ``--help`` shows its docstring and flags, and exits 0."""
  from absl import flags

  module = launcher(name)
  if hasattr(module, "define_flags"):  # Launchers whose flags clash with others' on import.
    module.define_flags()
  for root in config_roots(sys.argv[1:]):
    if root not in sys.path:
      sys.path.append(root)  # Never ahead of the installed inhernet_jax.
  # Help text: the launcher's, not the console script's (absl reads __main__ / argv[0]).
  sys.modules["__main__"].__doc__ = module.__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(module):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  launcher("cli").run(module.main, interrupted=INTERRUPTED.get(name, "stopped"))


# What Ctrl-C leaves, per command (as its launcher says under ``python -m``).
INTERRUPTED = {
    "main": "run the same command again to resume from the last checkpoints",
    "compare_init": "run the same command again: a trained teacher is restored",
    "sentence_distill": "run the same command again: finished students are kept and the one "
                        "in training resumes from its last checkpoint",
}


def _command(launcher: str, command: str):
  """The console command ``command`` = ``python -m launch.<launcher>``."""
  def main() -> None:
    run(launcher)
  main.__name__ = launcher
  main.__doc__ = f"``{command}`` = ``python -m launch.{launcher}``."
  return main


train = _command("main", "inhernet-train")
inherit = _command("inherit", "inhernet-inherit")
convert = _command("convert", "inhernet-convert")
compare_init = _command("compare_init", "inhernet-compare-init")
inherit_effnet = _command("inherit_effnet", "inhernet-inherit-effnet")
sentence_distill = _command("sentence_distill", "inhernet-sentence-distill")
