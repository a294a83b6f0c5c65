r"""Runs an experiment: teacher -> students -> InherNet, then the report.

  python -m launch.main --config=configs/digits.py --workdir=workdir/digits
  python -m launch.main --config=configs/chars.py --workdir=workdir/chars \
      --config.seeds=3 --config.compute_dtype=bfloat16

Installed (``pip install``), the same command is ``inhernet-train``, with the same flags.

Killed and started again with the same command, it resumes from the last checkpoints.
On several hosts, run the same command on every host (TPU pods: as it is; GPU clusters
and CPU processes: with --coordinator_address, --num_processes and --process_id, or the
JAX_* environment; see launch/tpu_pod.sh, launch/gpu_cluster.sh, launch/multihost_local.sh).
Writes results.json, results.md, curves.png (and rank_heads.png for sweeps) into workdir.
"""

import logging as pylogging

from absl import app, flags, logging
from ml_collections import config_flags

from inhernet_jax.parallel import distributed
from inhernet_jax.experiment import preflight
from inhernet_jax.experiment import runs as experiment
from . import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host GPU/CPU; TPU pods need none).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize: 'auto' when a coordinator, several processes, a SLURM/MPI "
    "job or a multi-host TPU slice is detected.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record) -> bool:
  # Orbax logs every save step at INFO; keep its warnings, drop the chatter.
  return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def check(config, workdir: str) -> None:
  """The whole config and the workdir, before anything trains, loads or logs
  (`preflight.check_run`: every field, model, spec, hint, the data and the workdir).

  Raises:
    validate.ConfigError: naming every offending field.
  """
  preflight.check_run(config, workdir)


def main(argv):
  logging.get_absl_logger().addFilter(_quiet_orbax)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = cli.load_config(_CONFIG)
  # Before anything touches a device.
  with cli.quiet():  # Its one-line error first, if any.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           mode=_DISTRIBUTED.value)
    check(config, _WORKDIR.value)
  if not distributed.is_primary():  # One process logs; every process computes.
    logging.set_verbosity(logging.WARNING)
  logging.info("config:\n%s", config)
  # Another run's checkpoint, a busy workdir, a full disk: one line (`cli.guarded`).
  results = experiment.train_and_evaluate(config, _WORKDIR.value)
  if not distributed.is_primary():
    return
  print(results["table"])
  for name, path in sorted(results["files"].items()):
    print(f"{name}: {path}")


RESUME = "run the same command again to resume from the last checkpoints"

if __name__ == "__main__":
  cli.run(main, interrupted=RESUME)
