"""Multi-host start-up: one idempotent `jax.distributed.initialize`, and who writes.

A TPU pod needs no arguments (JAX finds the workers from the TPU metadata). A GPU
cluster or a set of CPU processes needs the coordinator's address, the number of
processes and this process's id: from flags, or from the environment variables
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (SLURM and
Open MPI jobs are detected by JAX itself).

Example:
  ```python
  distributed.initialize()                      # single host: does nothing
  distributed.initialize("10.0.0.1:1234", 2, 0)  # process 0 of 2
  if distributed.is_primary():
    write_results(...)
  ```
"""

from __future__ import annotations

import os

import jax
from absl import logging

# Environment variables that mean "this process is one of several".
_CLUSTER_ENV = {
    "SLURM_NTASKS": "SLURM",
    "OMPI_COMM_WORLD_SIZE": "Open MPI",
}


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r}: expected an int") from None


def wanted(coordinator_address: str | None = None, num_processes: int | None = None,
           mode: str = "auto") -> bool:
  """Whether `initialize` would start the distributed runtime.

  ``mode``: ``"on"`` always, ``"off"`` never, ``"auto"`` when a coordinator or more than
  one process is given (arguments or ``JAX_*`` environment), when a SLURM / Open MPI job
  has more than one task, or on a multi-host TPU slice (``TPU_WORKER_HOSTNAMES`` lists
  more than one worker).
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode must be 'auto', 'on' or 'off', got {mode!r}")
  if mode != "auto":
    return mode == "on"
  if coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if (num_processes or _env_int("JAX_NUM_PROCESSES") or 1) > 1:
    return True
  if any((_env_int(name) or 1) > 1 for name in _CLUSTER_ENV):
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, mode: str = "auto") -> bool:
  """Starts JAX's multi-process runtime once; later calls do nothing.

  Must run before anything touches a device. Arguments override the ``JAX_*``
  environment variables; what neither gives, JAX detects (TPU, SLURM, Open MPI).

  Returns:
    Whether the runtime is (now) initialized.

  Raises:
    ValueError: a process id outside ``[0, num_processes)``, or bad environment values.
  """
  if jax.distributed.is_initialized():
    return True
  if not wanted(coordinator_address, num_processes, mode):
    return False
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, num_processes={num_processes}), got {process_id}")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def is_primary() -> bool:
  """True on process 0: the one that writes logs, tables and plots."""
  return jax.process_index() == 0
