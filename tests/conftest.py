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
