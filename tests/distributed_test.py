"""Tests for `inhernet_jax.parallel.distributed`: when to start the multi-process runtime, and how.

`jax.distributed.initialize` is replaced by a recorder throughout: nothing here starts
a coordinator or touches another process.
"""

import jax
import pytest

from inhernet_jax.parallel import distributed

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
       "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def env(monkeypatch):
  """A plain single host: none of the variables that mean 'one of several processes'."""
  for name in ENV:
    monkeypatch.delenv(name, raising=False)

  def set_env(**values):
    for name, value in values.items():
      monkeypatch.setenv(name, value)

  return set_env


@pytest.fixture
def calls(monkeypatch):
  """Records `jax.distributed.initialize` calls (not initialized until one is made)."""
  made = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: made.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(made))
  return made


@pytest.mark.parametrize("variables, args, want", [
    ({}, {}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, {}, True),
    ({"JAX_COORDINATOR_ADDRESS": ""}, {}, False),  # Empty means unset.
    ({"JAX_NUM_PROCESSES": "1"}, {}, False),
    ({"JAX_NUM_PROCESSES": "2"}, {}, True),
    ({"JAX_NUM_PROCESSES": ""}, {}, False),
    ({"SLURM_NTASKS": "1"}, {}, False),
    ({"SLURM_NTASKS": "4"}, {}, True),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, {}, False),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}, True),
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0"}, {}, False),
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1"}, {}, True),
    ({}, {"coordinator_address": "localhost:1234"}, True),
    ({}, {"num_processes": 1}, False),
    ({}, {"num_processes": 2}, True),
    # Arguments win over the environment.
    ({"JAX_NUM_PROCESSES": "4"}, {"num_processes": 1}, False),
    ({"JAX_NUM_PROCESSES": "1"}, {"num_processes": 2}, True),
    # Explicit modes ignore everything else.
    ({}, {"mode": "on"}, True),
    ({"SLURM_NTASKS": "4", "JAX_NUM_PROCESSES": "2"}, {"mode": "off"}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, {"mode": "off"}, False),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, {"mode": "auto"}, True),
])
def test_wanted(env, variables, args, want):
  env(**variables)
  assert distributed.wanted(**args) is want


@pytest.mark.parametrize("mode", ["yes", "ON", "", None, True])
def test_bad_mode_is_rejected(env, mode):
  with pytest.raises(ValueError, match="mode must be 'auto', 'on' or 'off'"):
    distributed.wanted(mode=mode)


@pytest.mark.parametrize("name", ["JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"])
@pytest.mark.parametrize("value", ["two", "2.0", "4 tasks"])
def test_bad_int_in_the_environment_names_the_variable(env, name, value):
  env(**{name: value})
  with pytest.raises(ValueError, match=f"{name}={value!r}: expected an int"):
    distributed.wanted()


def test_bad_process_id_in_the_environment_names_the_variable(env, calls):
  env(JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="first")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='first'"):
    distributed.initialize()
  assert calls == []


def test_single_host_does_nothing(env, calls):
  assert distributed.initialize() is False
  assert distributed.initialize(mode="off") is False
  env(JAX_NUM_PROCESSES="2", JAX_COORDINATOR_ADDRESS="h:1")
  assert distributed.initialize(mode="off") is False
  assert calls == []
  assert distributed.is_primary()  # Process 0 of 1.


def test_env_of_two_processes_initializes_once(env, calls):
  env(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
  assert distributed.initialize() is True
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                    "process_id": 1}]
  # Idempotent: already initialized, nothing more is called, whatever the arguments.
  assert distributed.initialize() is True
  assert distributed.initialize("other:1", 4, 3, mode="on") is True
  assert len(calls) == 1


def test_arguments_override_the_environment(env, calls):
  env(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
  assert distributed.initialize("localhost:555", 4, 3) is True
  assert calls == [{"coordinator_address": "localhost:555", "num_processes": 4,
                    "process_id": 3}]


def test_process_id_zero_is_not_taken_for_unset(env, calls):
  env(JAX_PROCESS_ID="1")
  distributed.initialize("localhost:555", 2, 0)
  assert calls == [{"coordinator_address": "localhost:555", "num_processes": 2,
                    "process_id": 0}]


def test_cluster_env_leaves_the_details_to_jax(env, calls):
  # SLURM / Open MPI / TPU: JAX reads the cluster itself; nothing is made up.
  env(SLURM_NTASKS="4")
  assert distributed.initialize() is True
  assert calls == [{"coordinator_address": None, "num_processes": None, "process_id": None}]


def test_mode_on_initializes_a_single_host(env, calls):
  assert distributed.initialize(mode="on") is True
  assert calls == [{"coordinator_address": None, "num_processes": None, "process_id": None}]


@pytest.mark.parametrize("args, variables", [
    (("localhost:1", 2, 2), {}),
    (("localhost:1", 2, -1), {}),
    (("localhost:1", 4, 7), {}),
    ((None, None, 2), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                          "JAX_PROCESS_ID": "2"}),
    (("localhost:1", None, None), {"JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "5"}),
])
def test_bad_process_id_fails_before_jax_distributed(env, calls, args, variables):
  env(**variables)
  with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes=\d\)"):
    distributed.initialize(*args)
  assert calls == []
  assert not jax.distributed.is_initialized()
