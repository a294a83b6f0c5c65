"""Deprecated: moved to `benchmarks.llama` (`python -m benchmarks.llama`)."""

from benchmarks import llama as _new
from launch import _moved

_moved.forward(__name__, "launch.benchmark_llama", _new)
