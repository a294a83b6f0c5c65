"""The environment of the tests' launcher subprocesses (``python -m launch.…``).

One XLA thread and BLAS thread per process (two pytest workers share two cores), and
XLA's CPU backend at -O0: a launcher test runs tiny programs once or twice, so their
compile time is nearly all of its CPU time and -O0 roughly halves it (what these tests
check, error lines, resumes and results equal across runs of the same command, holds at
any level). ``--xla_backend_optimization_level`` comes first: XLA stops reading flags at
the bare ``intra_op_parallelism_threads=1``. Files that compare runs across meshes to
1e-5 (sharded_train_test) set their own flags, at the default level.
"""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false "
             "intra_op_parallelism_threads=1")


def env(**extra: str) -> dict:
  """``os.environ`` with this checkout first on PYTHONPATH and the flags above."""
  return {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": XLA_FLAGS, **extra}
