"""Deprecated: moved to `benchmarks.scale` (`python -m benchmarks.scale`)."""

from benchmarks import scale as _new
from launch import _moved

_moved.forward(__name__, "launch.benchmark_scale", _new)
