#!/usr/bin/env bash
# Runs the test suite (installs requirements.txt into .venv first if needed).
#   bash launch/test.sh            # everything
#   bash launch/test.sh -k svd     # extra arguments go to pytest
# The parity tests' PyTorch references and the docs build (tests/requirements.txt), installed
# once, in env.sh's one pip call with requirements.txt.
INHERNET_REQUIREMENTS="tests/requirements.txt ${INHERNET_REQUIREMENTS:-}"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# Three pytest workers on a 2-core machine (a third keeps both cores busy while a test
# waits on a subprocess, a file or a signal): one XLA/BLAS thread each, or their spinning
# thread pools oversubscribe the cores and slow everything down many times.
# XLA's CPU backend (LLVM) at -O0: the suite's tiny programs are compiled far more often
# than they run long (benchmark_step_test: 40.6 s -> 24.9 s of CPU). First: XLA stops
# reading flags at the bare `intra_op_parallelism_threads=1`. (Files whose subprocesses
# compare runs across meshes to 1e-5 set their own XLA_FLAGS, at the default level.)
export XLA_FLAGS="--xla_backend_optimization_level=0 ${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# Bytecode cached on first import (some machines set PYTHONDONTWRITEBYTECODE=1): the suite
# starts about a hundred Python processes (two workers, every launcher test's subprocess),
# and without .pyc files each one compiles jax, flax, orbax, ... from source again, 3-4 s
# of CPU each (launch_inherit + launch_main tests in a fresh venv: 160 -> 82 s of CPU).
unset PYTHONDONTWRITEBYTECODE
# One persistent XLA compilation cache for the whole run (both workers and the tests'
# subprocesses): the suite compiles the same tiny models many times (every seed, every
# method, every launcher run), and a cached executable loads in milliseconds.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$venv/jax-cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
# Whole files per worker (--dist loadfile): a module's shared fixtures (a teacher run, the
# 8-device mesh runs, a built wheel) are made once, not once on each worker; files go out
# in tests/conftest.py's order (the longest first, --no-loadscope-reorder), so the two
# workers finish together.
exec python -m pytest tests -n "${PYTEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder \
  --durations=30 "$@"
