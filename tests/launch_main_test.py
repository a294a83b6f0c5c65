"""`launch/main.py`'s errors: one line, no traceback, before anything trains."""

import pathlib
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp

from inhernet_jax import models
from inhernet_jax.training import checkpoint

import launcher_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(*args):
  env = launcher_env.env()
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


def _child_env():
  return launcher_env.env()


# `python -m launch.main ARGS`, after setting what a shell would have set (no preexec_fn:
# forking this multithreaded JAX process and running Python before exec can deadlock):
# SIGINT raising KeyboardInterrupt (a runner may start the tests with it ignored) and
# the file-size limit of `ulimit -f` (0: none).
_LAUNCH = ("import resource, runpy, signal, sys\n"
           "limit = int(sys.argv.pop(1))\n"
           "if limit:\n"
           "  hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]\n"
           "  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))\n"
           "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
           "runpy.run_module('launch.main', run_name='__main__', alter_sys=True)\n")


def _launch_main(*args, file_size_limit: int = 0):
  return [sys.executable, "-c", _LAUNCH, str(file_size_limit), *map(str, args)]


def test_a_real_ctrl_c_is_one_line_and_the_same_command_resumes(tmp_path):
  """A real SIGINT (what Ctrl-C sends), at a scripted point: once the teacher's first
  epoch is logged (the child's own progress line, read from its stderr: no sleeps), while
  it saves that epoch or trains the next. One ``interrupted:`` line with the resume hint,
  exit status 130, no traceback; then the same command resumes from the checkpoints."""
  cmd = _launch_main("--config=configs/digits.py:local", f"--workdir={tmp_path}",
                     "--config.methods=student")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  before = []
  try:
    for line in proc.stderr:
      before.append(line)
      if "teacher epoch 1:" in line:
        proc.send_signal(signal.SIGINT)
        break
    _, after = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert before and "teacher epoch 1:" in before[-1], "".join(before)[-3000:]
  assert proc.returncode == 130, after[-3000:]
  assert "Traceback" not in after and "Exception" not in after, after[-3000:]
  lines = after.strip().splitlines()
  assert lines[-1] == ("interrupted: run the same command again to resume from the last "
                       "checkpoints"), after[-3000:]
  # Nothing else but the child's own log lines (a save finishing, a step logged).
  assert all(re.match(r"^(?:[IW]\d{4} |\s)", l) for l in lines[:-1]), after[-3000:]
  assert not (tmp_path / "results.json").exists()
  resumed = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert re.search(r"\bteacher: resumed from step [1-9]", resumed.stderr), \
      resumed.stderr[-3000:]
  assert (tmp_path / "results.json").exists()


def test_a_write_refused_by_the_kernel_while_training_is_one_error_line(tmp_path):
  """A real refused write, through the real command: a file-size limit (RLIMIT_FSIZE,
  what ``ulimit -f 8`` sets) makes the kernel refuse TensorStore's write of the teacher's
  first checkpoint, in orbax's save threads, with EFBIG ("File too large"). A full disk
  is the same write(2) failure with ENOSPC; filling one needs a mount this test cannot
  make, so ENOSPC's text is checked in tests/bad_inputs_test.py (`disk_full_in_tensorstore`).
  One ``error:`` line at the end, exit status 1, no traceback, none of orbax's own logs of
  the failure, and no step counted as saved."""
  env = _child_env()
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # Its entries would hit the limit too.
  proc = subprocess.run(
      _launch_main("--config=configs/digits.py:local", f"--workdir={tmp_path}",
                   "--config.methods=student", file_size_limit=8192),
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # Pipes: not limited.
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert [l for l in lines if l.startswith("error: ")] == [lines[-1]], proc.stderr[-3000:]
  assert "teacher/checkpoints/0" in lines[-1] and "File too large (a file-size limit" in lines[-1]
  assert not [l for l in lines if re.match(r"^E\d{4} ", l)], proc.stderr[-3000:]
  assert not (tmp_path / "seed_0" / "teacher" / "checkpoints" / "0").exists()
