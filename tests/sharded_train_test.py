"""Sharded training: any mesh, any number of processes, the single-device result.

Each case runs `sharded_train_script.py` in fresh processes: the simulated device count
(``--xla_force_host_platform_device_count=8``) and `jax.distributed` must be set before
JAX starts.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[1]
SCRIPT = ROOT / "tests" / "sharded_train_script.py"
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {SINGLE_THREAD}"
  env["PYTHONPATH"] = str(ROOT)
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def _run(args, devices=1):
  return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT,
                          env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(proc, timeout=1800):  # Wall time: generous on a loaded machine.
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()  # Not left running (and taking the CPU) after the test has failed.
    proc.communicate()
    raise
  assert proc.returncode == 0, out[-4000:]


def _max_diff(a, b) -> float:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
  out = tmp_path_factory.mktemp("meshes") / "out.json"
  _finish(_run(["meshes", out], devices=8))
  return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet", "gpt"])
@pytest.mark.parametrize("shape", ["(8, 1)", "(4, 2)", "(2, 4)"])
def test_three_steps_on_a_mesh_equal_one_device(meshes, model, shape):
  base, got = meshes[f"{model} (1, 1)"], meshes[f"{model} {shape}"]
  assert abs(got["train_loss"] - base["train_loss"]) < 1e-5
  assert abs(got["test_loss"] - base["test_loss"]) < 1e-5
  assert _max_diff(got["state"], base["state"]) < 1e-5


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_mesh(meshes):
  base, got = meshes["resnet 2 epochs (1, 1)"], meshes["resnet resumed (4, 2) -> (2, 4)"]
  assert got["resumed_from"] == 3 and base["resumed_from"] is None
  assert abs(got["train_loss"] - base["train_loss"]) < 1e-5
  assert _max_diff(got["state"], base["state"]) < 1e-5


@pytest.mark.slow
def test_meshes_shard_what_the_rules_say(meshes):
  fsdp = meshes["resnet (4, 2)"]["specs"]
  assert fsdp["stem/kernel"] == "P(None, None, None, 'fsdp')"
  assert fsdp["layer1_0/conv1/down/kernel"] == "P(None, None, 'fsdp')"
  assert set(meshes["resnet (8, 1)"]["specs"].values()) == {"P()"}  # pure data
  tp = meshes["gpt (2, 4)"]["specs"]
  # Column-parallel: experts' outputs split; row-parallel: the down-projection's input.
  assert tp["blocks/attn/query/up/kernel"] == "P(None, None, None, 'model')"
  assert tp["blocks/mlp/fc1/up/bias"] == "P(None, None, 'model')"
  assert tp["blocks/mlp/fc2/down/kernel"] == "P(None, 'model', None)"
  assert tp["blocks/attn/query/gate/kernel"] == "P()"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_and_write_one_checkpoint(tmp_path, meshes):
  workdir, port = tmp_path / "run", _free_port()
  procs = [_run(["worker", tmp_path / f"worker{i}.json", workdir, f"localhost:{port}", 2, i])
           for i in range(2)]
  for p in procs:
    _finish(p)
  multi = json.loads((tmp_path / "worker0.json").read_text())
  assert not (tmp_path / "worker1.json").exists()  # Only process 0 writes.
  assert (multi["process_count"], multi["devices"]) == (2, 2)
  # One checkpoint directory, written by both processes together, read by one (this one).
  assert sorted(os.listdir(workdir / "checkpoints")) == ["0", "3"]
  from inhernet_jax.training import checkpoint as ckpt_lib  # (orbax: only when run)

  restored = ckpt_lib.load_variables(workdir, _arrays(multi["state"]))
  # The same run on one device: the meshes fixture's (1, 1) run.
  single = meshes["resnet (1, 1)"]
  assert abs(multi["train_loss"] - single["train_loss"]) < 1e-5
  assert abs(multi["test_loss"] - single["test_loss"]) < 1e-5
  assert _max_diff(multi["state"], single["state"]) < 1e-5
  assert _max_diff(multi["state"], _lists(restored)) == 0.0


def _arrays(tree):
  """The JSON state (nested lists) as float32 NumPy arrays, the dicts kept."""
  if isinstance(tree, dict):
    return {k: _arrays(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


def _lists(tree):
  return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)
