"""Deprecated: moved to `benchmarks.engine` (`python -m benchmarks.engine`)."""

from benchmarks import engine as _new
from launch import _moved

_moved.forward(__name__, "launch.benchmark", _new)
