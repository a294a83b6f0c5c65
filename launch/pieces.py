r"""Runs a pieces benchmark (configs/fmnist_converged.py) piece by piece, then its report.

  nice -n 19 python -m launch.pieces --config=configs/fmnist_converged.py \
      --root=$HOME/fmnist_converged --out=docs/results/fmnist_converged
  python -m launch.pieces ... --report_only      # the combined report of what is done

Each piece is a variant of the config (``piece=<name>,seed=<s>,root=<root>``) run into
``<root>/<name>/seed_<s>`` (`inhernet_jax.experiment.pieces`); finished pieces are
skipped, a killed one resumes from its checkpoints, so the same command continues the
benchmark. The combined report is rewritten after every piece.
"""

import importlib.util
import os
import shlex
import sys

from absl import app, flags, logging

from inhernet_jax.experiment import pieces as pieces_lib

_CONFIG = flags.DEFINE_string("config", "configs/fmnist_converged.py", "The pieces config file.")
_ROOT = flags.DEFINE_string("root", None, "Directory of the pieces' checkpoints and results.")
_OUT = flags.DEFINE_string("out", None, "Where the combined results.json/.md/curve.png go.")
_ONLY = flags.DEFINE_list("pieces", [], "Run only these pieces (names; all seeds of each).")
_SEEDS = flags.DEFINE_list("seeds", [], "Run only these seeds (default: every seed).")
_EXTRA = flags.DEFINE_string("config_arg", "", "Extra config arguments for every piece "
                             "(``epochs=1,train_examples=512``: a quick trial).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only write the combined report.")
flags.mark_flags_as_required(["root", "out"])


def load_module(path: str):
  """The config file ``path`` as a module (its ``get_config``, ``pieces``, ...)."""
  if not os.path.exists(path):
    raise app.UsageError(f"--config={path}: no such file")
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for name in ("get_config", "pieces", "rows", "curve_pieces"):
    if not hasattr(module, name):
      raise app.UsageError(f"--config={path}: not a pieces config (it has no {name}())")
  return module


def curve_points(module) -> dict[str, tuple[int, str]]:
  names = {"student": "scratch", "student_kd": "KD", "inherit_h3": "InherNet H=3"}
  points = {m: (25, names[m]) for m in module.CURVE_METHODS}
  points.update({k: (p, names[m]) for k, (p, m) in module.curve_pieces().items()})
  return points


def report(module, root: str, out: str) -> dict:
  rows = module.rows(module.EPOCHS)
  command = " ".join(shlex.quote(a) for a in ["nice", "-n", "19", sys.executable, "-m",
                                              "launch.pieces", *sys.argv[1:]]
                     if a != "--report_only")
  return pieces_lib.combined_report(
      root, out, pieces=module.pieces(), title="Fashion-MNIST, converged benchmark",
      students=[k for k, v in rows.items() if v["kind"] == "student"], candidate="inherit_h3",
      curve=curve_points(module), command=command)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  module = load_module(_CONFIG.value)
  root = os.path.abspath(_ROOT.value)
  todo = module.pieces()
  if _ONLY.value:
    known = {n for n, _ in todo}
    unknown = sorted(set(_ONLY.value) - known)
    if unknown:
      raise app.UsageError(f"--pieces: unknown {unknown}; known: {sorted(known)}")
    todo = [(n, s) for n, s in todo if n in _ONLY.value]
  if _SEEDS.value:
    todo = [(n, s) for n, s in todo if str(s) in _SEEDS.value]
  if not _REPORT_ONLY.value:
    for name, seed in todo:
      arg = f"piece={name},seed={seed},root={root}" + (f",{_EXTRA.value}" if _EXTRA.value else "")
      directory = pieces_lib.piece_dir(root, name, seed)
      if pieces_lib.is_done(directory):
        continue
      logging.info("piece %s seed %d -> %s", name, seed, directory)
      pieces_lib.run_piece(module.get_config(arg), directory)
      report(module, root, _OUT.value)
  result = report(module, root, _OUT.value)
  print(f"{len(module.pieces()) - len(result['missing'])} of {len(module.pieces())} pieces "
        f"done; report in {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
