"""`launch/main.py`'s errors: one line, no traceback, before anything trains."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp

from inhernet_jax import models
from inhernet_jax.training import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  return subprocess.run([sys.executable, "-m", "launch.main", *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_line_error(proc, *fragments):
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, proc.stderr[-2000:]
  text = proc.stderr[proc.stderr.index("error: "):]
  for f in fragments:
    assert f in text, text


def test_missing_config_file(tmp_path):
  _one_line_error(_main("--config=configs/nope.py", f"--workdir={tmp_path}"),
                  "--config=configs/nope.py: no such config file")


def test_bad_overrides_fail_before_anything_trains(tmp_path):
  proc = _main("--config=configs/digits.py:local", f"--workdir={tmp_path / 'w'}",
               "--config.method_defs.inherit.rank=0", "--config.batch_size=0")
  _one_line_error(proc, "config.batch_size: expected an int >= 1, got 0",
                  "config.method_defs.inherit.rank: a rank must be >= 1")
  assert not (tmp_path / "w").exists()


def test_checkpoint_meta_without_history(tmp_path):
  """A teacher checkpoint whose meta lacks the history: named, not a KeyError."""
  model = models.create("cnn", num_classes=10, widths=(8, 16, 32))
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
  mngr = checkpoint.manager(tmp_path / "seed_0" / "teacher" / "checkpoints", async_save=False)
  checkpoint.save(mngr, 3, {"params": params}, {"note": "not a training run"})
  mngr.close()
  proc = _main("--config=configs/digits.py:local", f"--workdir={tmp_path}", "--config.methods=student")
  _one_line_error(proc, "has no 'history'", "delete")
