"""Deprecated: moved to `benchmarks.memory` (`python -m benchmarks.memory`)."""

from benchmarks import memory as _new
from launch import _moved

_moved.forward(__name__, "launch.benchmark_memory", _new)
