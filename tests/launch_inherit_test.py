"""Tests for launch/inherit.py, run as a subprocess on a teacher checkpoint saved the way
`launch.main` saves one (a TrainState under ``RUN_DIR/checkpoints``)."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from inhernet_jax import models
from inhernet_jax.decomposition import accounting
from inhernet_jax.training import checkpoint
from inhernet_jax.interop import export
from inhernet_jax.training import trainer as train_lib
from inhernet_jax.decomposition.transform import inherit, resolve
from inhernet_jax.decomposition.spec import InherSpec

import launcher_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCAL = (8, 16, 32)      # configs/digits.py:local teacher widths.
DEFAULT = (32, 64, 128)  # configs/digits.py teacher widths (151,306 params).
KERNELS = {"stem/kernel", "conv/kernel", "fc/kernel", "head/kernel"}
X = jnp.zeros((1, 8, 8, 1), jnp.float32)


def _env():
  return launcher_env.env()


def launch(*args):
  return subprocess.run([sys.executable, "-m", "launch.inherit", *map(str, args)], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=300)


def save_teacher(run_dir, widths, seed=0):
  """A digits CNN teacher's params (random init), saved as a launch.main run directory."""
  model = models.create("cnn", num_classes=10, widths=widths)
  params = model.init(jax.random.key(seed), X, train=False)["params"]
  state = train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
  mngr = checkpoint.manager(run_dir / "checkpoints")
  checkpoint.save(mngr, 0, state, {"history": {}})
  mngr.wait_until_finished()
  mngr.close()
  return model, params


def inherited_abstract(model, spec):
  return jax.eval_shape(lambda: model.clone(spec=spec).init(jax.random.key(0), X, train=False))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  root = tmp_path_factory.mktemp("teachers")
  return {"local": (root / "local", *save_teacher(root / "local", LOCAL)),
          "default": (root / "default", *save_teacher(root / "default", DEFAULT, seed=1))}


@pytest.fixture(scope="module")
def rank4(teachers, tmp_path_factory):
  """One run: digits:local teacher at rank 4 with 2 heads."""
  run_dir = teachers["local"][0]
  out = tmp_path_factory.mktemp("rank4") / "out"
  proc = launch("--config=configs/digits.py:local", f"--teacher={run_dir}", "--rank=4",
                "--heads=2", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc


def test_rank_writes_checkpoint_spec_and_report(teachers, rank4):
  out, proc = rank4
  _, model, teacher_params = teachers["local"]
  for name in ("report.md", "report.json", "spec.json"):
    assert (out / name).is_file(), name
  rows = json.loads((out / "report.json").read_text())
  assert {r["path"] for r in rows} == KERNELS and len(rows) == len(KERNELS)
  by_path = {r["path"]: r for r in rows}
  assert all(r["rank"] <= 4 for r in rows)
  for path in ("stem/kernel", "head/kernel"):  # The default preset keeps them.
    assert by_path[path]["action"] == "keep"
  for path in ("conv/kernel", "fc/kernel"):
    assert (by_path[path]["action"], by_path[path]["rank"], by_path[path]["heads"]) == (
        "factorize", 4, 2)
  spec_json = json.loads((out / "spec.json").read_text())
  meta = spec_json["metadata"]
  assert (meta["model"], meta["num_classes"]) == ("cnn", 10)
  assert (spec_json["spec"]["rank"], spec_json["spec"]["heads"]) == (4, 2)
  spec = InherSpec(rank=4, heads=2, rules=models.preset("default", "cnn"))
  assert export.load_spec(out / "spec.json") == (spec, meta)
  assert "fc/kernel" in (out / "report.md").read_text()

  loaded = checkpoint.load_variables(out, inherited_abstract(model, spec))
  expected = inherit(teacher_params, spec)
  assert jax.tree.structure(loaded["params"]) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               loaded["params"], expected)
  # Two heads give a gate; the stem is kept as the teacher's.
  assert loaded["params"]["conv"]["gate"]["kernel"].shape == (4, 2)
  np.testing.assert_array_equal(loaded["params"]["stem"]["kernel"],
                                teacher_params["stem"]["kernel"])
  after = accounting.param_count(loaded["params"])
  assert sum(r["params_after"] for r in rows) == after
  assert sum(r["params_before"] for r in rows) == accounting.param_count(teacher_params) > after
  assert f"inherited {after:,}" in proc.stdout


def test_rank_student_zoo_model(teachers, tmp_path):
  run_dir, model, teacher_params = teachers["default"]
  target = models.param_count("mlp", num_classes=10)  # 50,826, a third of the teacher.
  assert target < accounting.param_count(teacher_params)
  out = tmp_path / "out"
  proc = launch("--config=configs/digits.py", f"--teacher={run_dir}", "--rank=student:mlp",
                f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  spec_json = json.loads((out / "spec.json").read_text())["spec"]
  rules = models.preset("default", "cnn")
  want = accounting.rank_for_params(teacher_params, target, heads=3, rules=rules)
  assert (spec_json["rank"], spec_json["heads"]) == (want, 3)
  spec = InherSpec(rank=want, heads=3, rules=rules)
  loaded = checkpoint.load_variables(out, inherited_abstract(model, spec))
  count = accounting.param_count(loaded["params"])
  assert count <= target
  assert accounting.planned_param_count(teacher_params, spec.replace(rank=want + 1)) > target


def test_energy_spec_json_rebuilds_the_model(teachers, tmp_path):
  run_dir, model, teacher_params = teachers["local"]
  out = tmp_path / "out"
  proc = launch("--config=configs/digits.py:local", f"--teacher={run_dir}", "--energy=0.3",
                "--heads=2", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  spec, _ = export.load_spec(out / "spec.json")  # The resolved spec: exact per-layer rules.
  loaded = checkpoint.load_variables(out, inherited_abstract(model, spec))
  rules = models.preset("default", "cnn")
  want = resolve(teacher_params, InherSpec(energy=0.3, heads=2, rules=rules))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               loaded["params"], inherit(teacher_params, want))
  rows = {r["path"]: r for r in json.loads((out / "report.json").read_text())}
  for path in ("conv/kernel", "fc/kernel"):
    assert rows[path]["action"] == "factorize" and rows[path]["heads"] == 2
    assert rows[path]["energy"] >= 0.3 - 1e-6


def test_existing_out_is_refused(teachers, rank4):
  out, _ = rank4
  before = sorted(p.name for p in (out / "checkpoints").iterdir())
  proc = launch("--config=configs/digits.py:local", f"--teacher={teachers['local'][0]}",
                "--rank=2", f"--out={out}")
  assert proc.returncode != 0
  assert str(out) in proc.stderr and "already holds a checkpoint" in proc.stderr
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_teacher_of_another_architecture_is_refused(teachers, tmp_path):
  # A digits:local (widths 8/16/32) checkpoint given for the default config's teacher.
  proc = launch("--config=configs/digits.py", f"--teacher={teachers['local'][0]}",
                "--rank=4", f"--out={tmp_path / 'out'}")
  assert proc.returncode != 0
  assert "does not match" in proc.stderr
  assert "stem/kernel" in proc.stderr  # The diff names the leaves.
  assert not (tmp_path / "out").exists()


def test_rank_or_energy_is_required(teachers, tmp_path):
  proc = launch("--config=configs/digits.py:local", f"--teacher={teachers['local'][0]}",
                f"--out={tmp_path / 'out'}")
  assert proc.returncode != 0
  # (The usage text absl prints mentions both flags anyway: match the message itself.)
  assert "give exactly one of --rank, --energy and --budget" in proc.stderr
  assert not (tmp_path / "out").exists()


def _one_line_error(proc, *fragments):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  line = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(line) == 1, proc.stderr[-2000:]
  for f in fragments:
    assert f in line[0], line[0]


@pytest.mark.parametrize("flag, fragments", [
    ("--energy=1.5", ("--energy=1.5", "(0, 1]")),
    ("--heads=0", ("--heads=0", "int >= 1")),
])
def test_bad_spec_flags_are_one_line_naming_the_flag(teachers, tmp_path, flag, fragments):
  args = [flag] if flag.startswith("--energy") else ["--rank=4", flag]
  proc = launch("--config=configs/digits.py:local", f"--teacher={teachers['local'][0]}",
                *args, f"--out={tmp_path / 'out'}")
  _one_line_error(proc, *fragments)
  assert "--rank" not in proc.stderr.split("error: ")[1]  # Not blamed on --rank.
  assert not (tmp_path / "out").exists()


def test_a_bad_named_rank_is_one_line_naming_the_flag(teachers, tmp_path):
  # 'params:' is another method's size, in configs; on the command line no method is known.
  proc = launch("--config=configs/digits.py:local", f"--teacher={teachers['local'][0]}",
                "--rank=params:nope", f"--out={tmp_path / 'out'}")
  _one_line_error(proc, "--rank 'params:nope'", "'student:<zoo model>'")
  assert not (tmp_path / "out").exists()


def test_missing_config_file_is_one_line(teachers, tmp_path):
  proc = launch("--config=configs/nope.py", f"--teacher={teachers['local'][0]}", "--rank=4",
                f"--out={tmp_path / 'out'}")
  _one_line_error(proc, "--config=configs/nope.py", "no such config file")


def test_unfinished_teacher_is_refused_unless_asked(tmp_path):
  model = models.create("cnn", num_classes=10, widths=LOCAL)
  params = model.init(jax.random.key(0), X, train=False)["params"]
  state = train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
  mngr = checkpoint.manager(tmp_path / "teacher" / "checkpoints", async_save=False)
  checkpoint.save(mngr, 40, state, {"history": {}, "total_steps": 69})
  mngr.close()
  args = ("--config=configs/digits.py:local", f"--teacher={tmp_path / 'teacher'}", "--rank=4")
  proc = launch(*args, f"--out={tmp_path / 'out'}")
  _one_line_error(proc, "unfinished", "step 40 of 69", "--allow_unfinished")
  assert not (tmp_path / "out").exists()
  proc = launch(*args, "--allow_unfinished", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "step 40 of 69" in proc.stdout
