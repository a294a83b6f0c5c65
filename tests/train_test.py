"""The trainer: learning, losses, bf16, gate statistics, checkpoints and exact resume."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from inhernet_jax.training import checkpoint as ckpt_lib
from inhernet_jax import models
from inhernet_jax.data import pipeline as data
from inhernet_jax.training import trainer as train
from inhernet_jax.decomposition.transform import inherit
from inhernet_jax.decomposition.spec import InherSpec

import launcher_env

ROOT = pathlib.Path(__file__).parents[1]


def _config(**overrides):
  c = ml_collections.ConfigDict({
      "optimizer": {"name": "adam", "learning_rate": 3e-3, "schedule": "constant"},
      "compute_dtype": "float32", "checkpoint_every_steps": 5, "keep_checkpoints": 2,
      "async_checkpoints": False, "log_every_steps": 0, "progress": False,
  })
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def digits():
  return data.get({"name": "digits"}, batch_size=64, seed=0, eval_batch_size=512)


@pytest.fixture(scope="module")
def teacher(digits, tmp_path_factory):
  model = models.create("cnn", num_classes=10, widths=(8, 16, 32))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  run = train.train_and_evaluate(model, variables, digits, _config(), tmp_path_factory.mktemp("t"),
                                 seed=0, epochs=3, desc="teacher")
  return model, {"params": run.state.params}, run


def test_teacher_learns_and_history_is_complete(teacher, digits):
  _, _, run = teacher
  h = run.history
  assert h["epoch"] == [0, 1, 2, 3]
  assert h["step"] == [0, digits.steps_per_epoch, 2 * digits.steps_per_epoch, 3 * digits.steps_per_epoch]
  assert h["train_loss"][0] is None and all(x > 0 for x in h["train_loss"][1:])
  assert h["test_metric"][-1] > 0.6 > h["test_metric"][0]  # Ten classes: chance is 0.1.
  assert h["train_loss"][-1] < h["train_loss"][1]
  assert all(x > 0 for x in h["examples_per_s"][1:])


def test_kd_and_inherited_student_train_with_gate_stats(teacher, digits, tmp_path):
  model, t_vars, _ = teacher
  spec = InherSpec(rank=4, heads=3, rules=models.preset("default", "cnn"))
  student = model.clone(spec=spec)
  params = inherit(t_vars["params"], spec)
  before = jax.tree.map(np.asarray, t_vars["params"])
  run = train.train_and_evaluate(student, {"params": params}, digits, _config(), tmp_path,
                                 seed=1, epochs=1, loss="kd",
                                 loss_kwargs={"alpha": 0.3, "temperature": 4.0},
                                 teacher=(model, t_vars))
  # The teacher's arrays survive the donated train step of the student sharing them.
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, t_vars["params"]))
  assert run.gates, "an InherNet with H=3 must report gate statistics"
  for path, g in run.gates.items():
    assert g["load"].shape == (3,), path
    np.testing.assert_allclose(g["load"].sum(), 1.0, rtol=1e-5)
    assert 0.0 <= g["entropy"] <= math.log(3) + 1e-6
  assert run.history["gate_entropy"][-1] is not None
  assert math.isfinite(run.history["train_loss"][-1])


def test_fitnet_and_bf16(teacher, digits, tmp_path):
  model, t_vars, _ = teacher
  student = models.create("cnn", num_classes=10, widths=(4, 8, 16))
  variables = student.init(jax.random.key(3), jnp.zeros((1, 8, 8, 1)), train=False)
  run = train.train_and_evaluate(
      student, variables, digits, _config(compute_dtype="bfloat16"), tmp_path, seed=0,
      epochs=1, loss="fitnet", teacher=(model, t_vars), hint=train.Hint("conv", "conv", 1.0))
  # The connector (student 8 channels -> teacher 16) exists and was trained.
  assert run.state.connector["proj"]["kernel"].shape == (8, 16)
  assert run.state.params["head"]["kernel"].dtype == jnp.float32  # Master copy stays f32.
  assert math.isfinite(run.history["train_loss"][-1])
  assert run.history["test_metric"][-1] > 0.1


def test_bad_loss_setups_fail_before_training(teacher, digits, tmp_path):
  model, t_vars, _ = teacher
  v = {"params": t_vars["params"]}
  with pytest.raises(ValueError, match="needs a teacher"):
    train.train_and_evaluate(model, v, digits, _config(), tmp_path, seed=0, epochs=1, loss="kd",
                             loss_kwargs={"alpha": 0.5, "temperature": 2.0})
  with pytest.raises(ValueError, match="fitnet"):
    train.train_and_evaluate(model, v, digits, _config(), tmp_path, seed=0, epochs=1, loss="fitnet")
  assert not os.path.exists(tmp_path / "checkpoints" / "0")


def test_incompatible_or_corrupt_checkpoint_is_a_clear_error(teacher, digits, tmp_path):
  model, t_vars, _ = teacher
  train.train_and_evaluate(model, dict(t_vars), digits, _config(), tmp_path, seed=0, epochs=1)
  other = models.create("cnn", num_classes=10, widths=(4, 8, 16))
  o_vars = other.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  with pytest.raises(ckpt_lib.CheckpointError, match="does not match") as e:
    train.train_and_evaluate(other, o_vars, digits, _config(), tmp_path, seed=0, epochs=1)
  assert str(tmp_path) in str(e.value) and "shape mismatch" in str(e.value)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  for step in steps:  # Every step damaged: an error, nothing moved or deleted.
    for f in (tmp_path / "checkpoints" / str(step)).rglob("*"):
      if f.is_file() and f.name != "commit_success.txt":
        f.write_bytes(b"\x00garbage")
  with pytest.raises(ckpt_lib.CheckpointError, match="every checkpoint .* is damaged"):
    train.train_and_evaluate(model, dict(t_vars), digits, _config(), tmp_path, seed=0, epochs=1)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == steps


def _flip_bit(step_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """Flips one bit in the middle of the largest file of a step (the tensors' data)."""
  files = [f for f in step_dir.rglob("*") if f.is_file()]
  target = max(files, key=lambda f: f.stat().st_size)
  data = bytearray(target.read_bytes())
  data[len(data) // 2 + seed] ^= 1 << 3
  target.write_bytes(bytes(data))
  return target


def test_a_flipped_bit_falls_back_to_the_previous_good_step(teacher, digits, tmp_path):
  model, t_vars, _ = teacher
  config = _config(checkpoint_every_steps=0)
  train.train_and_evaluate(model, dict(t_vars), digits, config, tmp_path, seed=0, epochs=2)
  ckdir = tmp_path / "checkpoints"
  steps = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
  assert len(steps) == 2
  _flip_bit(ckdir / str(steps[-1]) / "state")
  run = train.train_and_evaluate(model, dict(t_vars), digits, config, tmp_path, seed=0, epochs=2)
  assert run.resumed_from == steps[0]  # The previous good step, then trained again.
  assert (tmp_path / "checkpoints.corrupt" / str(steps[-1])).is_dir()  # Kept aside.
  reference = train.train_and_evaluate(model, dict(t_vars), digits, config, tmp_path / "ref",
                                       seed=0, epochs=2)
  jax.tree.map(np.testing.assert_array_equal, run.state.params, reference.state.params)


def test_checksum_catches_every_single_bit_flip():
  from inhernet_jax.training import integrity

  x = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((5,), np.int32)}
  base = integrity.checksum(x)
  for leaf, size in (("a", 12 * 32), ("b", 5 * 32)):
    for bit in range(0, size, 7):
      y = {k: v.copy() for k, v in x.items()}
      flat = y[leaf].view(np.uint32).reshape(-1)
      flat[bit // 32] ^= np.uint32(1 << (bit % 32))
      assert integrity.mismatched(base, integrity.checksum(y)) == [leaf]


def test_checksum_on_the_host_equals_the_jitted_reduction():
  """The NumPy path (CPU leaves) and the jitted one (any mesh) give the same sums."""
  from inhernet_jax.training import integrity

  rng = np.random.default_rng(0)
  raw = rng.standard_normal((3, 5, 7)).astype(np.float32) * 1e3
  leaves = [jnp.asarray(raw), jnp.asarray(raw, jnp.bfloat16), jnp.asarray(raw, jnp.float16),
            jnp.asarray(raw, jnp.int8), jnp.asarray(raw.astype(np.int32)),
            jnp.asarray(raw, jnp.uint16), jnp.asarray(raw > 0), jnp.float32(3.5),
            jnp.zeros((0, 4)), jax.random.split(jax.random.key(7), 3),
            jax.random.PRNGKey(3), jnp.asarray(np.float64(np.pi))]
  jitted = jax.device_get(jax.jit(integrity._sums_impl)(leaves))
  host = integrity._host_sums(leaves)
  for i, (a, b) in enumerate(zip(jitted, host)):
    np.testing.assert_array_equal(np.asarray(a, np.uint32), b, err_msg=str(leaves[i].dtype))
  with jax.enable_x64(True):  # 64-bit leaves: two words per element.
    wide = [jnp.asarray(raw, jnp.float64), jnp.asarray(raw.astype(np.int64))]
    for a, b in zip(jax.device_get(jax.jit(integrity._sums_impl)(wide)),
                    integrity._host_sums(wide)):
      np.testing.assert_array_equal(np.asarray(a, np.uint32), b)
  nan = {"a": jnp.asarray([1.0, np.nan, np.inf], jnp.bfloat16), "b": np.ones(3, np.float32)}
  assert integrity.nonfinite(nan) == {"a": 2}


@pytest.mark.parametrize("change, field", [
    ({"config": _config(optimizer={"name": "adam", "learning_rate": 1e-2,
                                   "schedule": "constant"})}, "optimizer.learning_rate"),
    ({"epochs": 1}, "epochs"),
    ({"loss": "kd", "loss_kwargs": {"alpha": 0.5, "temperature": 2.0}}, "loss"),
])
def test_a_changed_run_does_not_resume_silently(teacher, digits, tmp_path, change, field):
  model, t_vars, _ = teacher
  student = models.create("cnn", num_classes=10, widths=(4, 8, 16))
  s_vars = student.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), train=False)
  train.train_and_evaluate(student, s_vars, digits, _config(), tmp_path, seed=0, epochs=2)
  kwargs = {"config": _config(), "seed": 0, "epochs": 2, **change}
  if kwargs.get("loss") == "kd":
    kwargs["teacher"] = (model, t_vars)
  with pytest.raises(ckpt_lib.CheckpointError, match="different run") as e:
    train.train_and_evaluate(student, s_vars, digits, kwargs.pop("config"), tmp_path, **kwargs)
  assert field in str(e.value) and "allow_resume_changes" in str(e.value)
  assert "Traceback" not in str(e.value)


def test_another_teacher_or_deliberately_extended_epochs(teacher, digits, tmp_path):
  model, t_vars, _ = teacher
  student = models.create("cnn", num_classes=10, widths=(4, 8, 16))
  s_vars = student.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), train=False)
  kd = dict(loss="kd", loss_kwargs={"alpha": 0.5, "temperature": 2.0})
  train.train_and_evaluate(student, s_vars, digits, _config(), tmp_path, seed=0, epochs=1,
                           teacher=(model, t_vars), **kd)
  other = jax.tree.map(lambda x: x * 1.01, t_vars)  # A retrained teacher, same shapes.
  with pytest.raises(ckpt_lib.CheckpointError, match="teacher: checkpoint"):
    train.train_and_evaluate(student, s_vars, digits, _config(), tmp_path, seed=0, epochs=1,
                             teacher=(model, other), **kd)
  with pytest.raises(ckpt_lib.CheckpointError, match="epochs: checkpoint 1, now 2"):
    train.train_and_evaluate(student, s_vars, digits, _config(), tmp_path, seed=0, epochs=2,
                             teacher=(model, t_vars), **kd)
  run = train.train_and_evaluate(student, s_vars, digits, _config(allow_resume_changes="epochs"),
                                 tmp_path, seed=0, epochs=2, teacher=(model, t_vars), **kd)
  assert run.resumed_from == digits.steps_per_epoch and run.history["epoch"] == [0, 1, 2]


def test_keep_checkpoints_zero_is_refused(teacher, digits, tmp_path):
  model, t_vars, _ = teacher
  with pytest.raises(ValueError, match="keep_checkpoints.*>= 1"):
    train.train_and_evaluate(model, dict(t_vars), digits, _config(keep_checkpoints=0), tmp_path,
                             seed=0, epochs=1)


def test_meta_without_history_is_a_clear_error(teacher, digits, tmp_path):
  model, t_vars, _ = teacher
  state = {"params": t_vars["params"]}
  mngr = ckpt_lib.manager(tmp_path / "checkpoints", async_save=False)
  ckpt_lib.save(mngr, 0, state, {"teacher": "x"})
  mngr.close()
  with pytest.raises(ckpt_lib.CheckpointError, match="no 'history'"):
    train.train_and_evaluate(model, dict(t_vars), digits, _config(), tmp_path, seed=0, epochs=1)


# ------------------------------------------------------------- kill -9 and resume
_CMD = [sys.executable, "-m", "launch.main", "--config=configs/digits.py:local",
        "--config.methods=student,inherit_kd", "--config.checkpoint_every_steps=7"]


def _env():
  return launcher_env.env()


def _checkpoints(workdir: pathlib.Path) -> int:
  """Finished checkpoints so far (orbax renames its temporary directories meanwhile)."""
  while True:
    try:
      return sum(1 for p in workdir.glob("seed_*/*/checkpoints/*") if p.name.isdigit())
    except FileNotFoundError:  # A directory vanished while being listed: look again.
      continue


def _saving(workdir: pathlib.Path) -> str | None:
  """An orbax temporary (unfinished) checkpoint directory under ``workdir``, if any."""
  try:
    for run in workdir.glob("seed_*/*/checkpoints"):
      for p in os.scandir(run):
        if "orbax-checkpoint-tmp" in p.name:
          return p.path
  except FileNotFoundError:  # Renamed while listed: the save just finished.
    pass
  return None


def _final_states(workdir: pathlib.Path) -> dict:
  out = {}
  for ckdir in sorted(workdir.rglob("checkpoints")):
    mngr = ocp.CheckpointManager(ckdir, item_names=("state",))
    step = mngr.latest_step()
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    out[str(ckdir.relative_to(workdir))] = (step, jax.tree.map(np.asarray, state))
    mngr.close()
  return out


def _results(workdir: pathlib.Path):
  runs = json.loads((workdir / "results.json").read_text())["runs"]
  for r in runs:  # Timings differ between runs; everything else must not.
    r.pop("wall_s")
    r["history"].pop("examples_per_s")
  return runs


@pytest.mark.slow
def test_sigkill_at_any_point_resumes_to_identical_results(tmp_path):
  reference = tmp_path / "reference"
  subprocess.run([*_CMD, f"--workdir={reference}"], cwd=ROOT, env=_env(), check=True,
                 capture_output=True)
  total = _checkpoints(reference)  # Checkpoints kept at the end (max_to_keep per run).
  assert total >= 6
  # Kill twice, at two points of the experiment (the teacher's and a later run's
  # checkpoints), then let the same command finish.
  killed = tmp_path / "killed"
  for kill_after in (2, 6):
    proc = subprocess.Popen([*_CMD, f"--workdir={killed}"], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
      if killed.exists() and _checkpoints(killed) >= kill_after:
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  # And once in the middle of a save: while orbax's temporary directory exists.
  proc = subprocess.Popen([*_CMD, f"--workdir={killed}"], cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline, caught = time.time() + 300, None
  while proc.poll() is None and time.time() < deadline and caught is None:
    caught = _saving(killed)
    if caught is not None:
      proc.send_signal(signal.SIGKILL)
    else:
      time.sleep(0.001)  # Not a spinning core: the run (and the other test worker) need it.
  proc.wait()
  assert proc.returncode == -signal.SIGKILL and caught, "no save was caught in progress"
  assert not (killed / "results.json").exists()
  subprocess.run([*_CMD, f"--workdir={killed}"], cwd=ROOT, env=_env(), check=True,
                 capture_output=True)
  assert _results(killed) == _results(reference)
  ref_states, got_states = _final_states(reference), _final_states(killed)
  assert ref_states.keys() == got_states.keys()
  for name, (step, state) in ref_states.items():
    assert got_states[name][0] == step, name
    jax.tree.map(np.testing.assert_array_equal, state, got_states[name][1])


def test_batch_norm_statistics_train_checkpoint_and_pass_to_inherited_net(digits, tmp_path):
  # A RepDistiller resnet8 (BatchNorm) on 8x8 digits: its running statistics are part
  # of the state, move during training, and come back from the checkpoint.
  model = models.create("resnet8", num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  assert variables["batch_stats"]
  run = train.train_and_evaluate(model, variables, digits, _config(), tmp_path / "t", seed=0,
                                 epochs=1)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       variables["batch_stats"], run.state.batch_stats)
  assert max(jax.tree.leaves(moved)) > 1e-3
  again = train.train_and_evaluate(model, variables, digits, _config(), tmp_path / "t", seed=0,
                                   epochs=1)  # Finished: restored, not retrained.
  assert again.resumed_from == digits.steps_per_epoch
  jax.tree.map(np.testing.assert_array_equal, run.state.batch_stats, again.state.batch_stats)
  assert again.history == run.history
  # The inherited network starts from the teacher's statistics and trains its own copy.
  t_vars = {"params": run.state.params, "batch_stats": run.state.batch_stats}
  spec = InherSpec(rank=4, heads=2, rules=models.preset("default", "resnet8"))
  student = model.clone(spec=spec)
  inherited = {"params": inherit(t_vars["params"], spec), "batch_stats": t_vars["batch_stats"]}
  s_run = train.train_and_evaluate(student, inherited, digits, _config(), tmp_path / "s", seed=0,
                                   epochs=1, loss="kd", loss_kwargs={"alpha": 0.5, "temperature": 2.0},
                                   teacher=(model, t_vars))
  assert jax.tree.structure(s_run.state.batch_stats) == jax.tree.structure(t_vars["batch_stats"])
  assert math.isfinite(s_run.history["test_loss"][-1])


def test_importing_the_trainer_needs_no_orbax():
  code = ("import sys; sys.modules['orbax'] = sys.modules['orbax.checkpoint'] = None\n"
          "from inhernet_jax.training import trainer as train\n"
          "assert 'inhernet_jax.training.checkpoint' not in sys.modules\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_given_checkpointer_saves_and_restores(digits, tmp_path):
  calls = []

  class Recording:
    def __getattr__(self, name):
      calls.append(name)
      return getattr(ckpt_lib, name)

  model = models.create("cnn", num_classes=10, widths=(4, 4, 4))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  train.train_and_evaluate(model, variables, digits, _config(), tmp_path, seed=0, epochs=1,
                           checkpointer=Recording())
  assert calls[:2] == ["manager", "restore_latest"] and "save" in calls
  assert (tmp_path / "checkpoints").is_dir()
