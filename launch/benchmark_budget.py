"""Deprecated: moved to `benchmarks.budget` (`python -m benchmarks.budget`)."""

from benchmarks import budget as _new
from launch import _moved

_moved.forward(__name__, "launch.benchmark_budget", _new)
