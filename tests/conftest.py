"""Shared test configuration for a small CPU box.

* BLAS runs single-threaded: numpy's reference SVDs are tiny, and a multi-threaded
  OpenBLAS competing with XLA (and with the other pytest-xdist worker) for two cores is
  orders of magnitude slower than one thread.
* XLA compile time dominates, so every property test draws few examples and no example
  has a deadline (the first example of a new shape pays for a compile).
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

try:  # numpy may already be loaded (by a plugin); limit its BLAS pool directly.
  import threadpoolctl

  threadpoolctl.threadpool_limits(1, user_api="blas")
except ImportError:  # pragma: no cover
  pass

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "inhernet",
    max_examples=15,
    deadline=None,
    suppress_health_check=[
        hypothesis.HealthCheck.too_slow,
        hypothesis.HealthCheck.data_too_large,
    ],
    print_blob=True,
)
hypothesis.settings.load_profile("inhernet")


# ---------------------------------------------------------------- scheduling (xdist)
# launch/test.sh runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`: each file goes
# whole to one worker (its module fixtures are made once), in the order below. The files
# that run longest (CPU seconds on the 2-core CI machine: end-to-end runs, subprocesses
# with 8 simulated devices, many compiles) go first, so that while one worker runs the
# last of them the other one works through the many short files, and both finish within
# seconds of each other (longest-processing-time-first). The other files keep pytest's
# order. A name here that no longer exists is ignored; a new slow file belongs here.
LONGEST_FIRST = (
    "sharded_train_test.py",     # 8-device mesh runs (module fixture) + 2-process training
    "experiment_test.py",        # four experiments end to end (digits, sweep, chars, ...)
    "benchmark_scale_test.py",   # the scale benchmark: 3 processes, 7 sharded steps
    "train_test.py",             # kill -9 and resume: five `launch.main` runs
    "inherit_sharded_test.py",   # two 8-device subprocesses
    "launch_inherit_test.py",    # ~15 `launch.inherit` subprocesses
    "user_models_test.py",       # eight user models (linen), H = 1 and 3, train + orbax
    "nnx_test.py",               # the NNX models: surgery, nnx.jit training, orbax
    "untrusted_inputs_test.py",  # bad files through launch.convert / launch.inherit / launch.main
    "launch_main_test.py",       # a real Ctrl-C and resume, a refused write: 4 `launch.main` runs
    "your_model_doc_test.py",    # runs every code block of docs/your-model.md
    "bad_inputs_test.py",
    "launch_user_model_test.py",
    "benchmark_test.py",
    "batch_stats_test.py",
    "convert_parity_test.py",
    "sentence_test.py",
    "inherit_test.py",
    "svd_test.py",
    "models_transformer_test.py",
    "lock_test.py",
    "launch_compare_init_test.py",
    "launch_recalibrate_test.py",
    "budget_test.py",
    "data_test.py",
    "docs_test.py",
    "package_test.py",
    "calibration_test.py",
    "spec_test.py",
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  # sorted() is stable: tests keep their order within a file, and unlisted files theirs.
  items[:] = sorted(items, key=lambda item: rank.get(item.path.name, len(rank)))
