r"""Runs an experiment: teacher -> students -> InherNet, then the report.

  python -m launch.main --config=configs/digits.py --workdir=workdir/digits
  python -m launch.main --config=configs/chars.py --workdir=workdir/chars \
      --config.seeds=3 --config.compute_dtype=bfloat16

Killed and started again with the same command, it resumes from the last checkpoints.
Writes results.json, results.md, curves.png (and rank_heads.png for sweeps) into workdir.
"""

import logging as pylogging

from absl import app, flags, logging
from ml_collections import config_flags

from inhernet_jax import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record) -> bool:
  # Orbax logs every save step at INFO; keep its warnings, drop the chatter.
  return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
  logging.get_absl_logger().addFilter(_quiet_orbax)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.info("config:\n%s", _CONFIG.value)
  results = experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(results["table"])
  for name, path in sorted(results["files"].items()):
    print(f"{name}: {path}")


if __name__ == "__main__":
  app.run(main)
