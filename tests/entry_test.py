"""`inhernet_jax._entry`: the console commands' launcher lookup and config roots."""

import os
import pathlib
import subprocess
import sys

import pytest

from inhernet_jax import _entry

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tree(tmp_path):
  (tmp_path / "repo" / "configs" / "sub").mkdir(parents=True)
  for f in ("configs/__init__.py", "configs/sub/__init__.py", "configs/a.py", "configs/sub/b.py"):
    (tmp_path / "repo" / f).write_text("")
  (tmp_path / "loose").mkdir()
  (tmp_path / "loose" / "c.py").write_text("")
  return tmp_path


def test_config_root_is_above_the_config_package(tmp_path):
  t = _tree(tmp_path)
  repo = str(t / "repo")
  assert list(_entry.config_roots([f"--config={t}/repo/configs/a.py"])) == [repo]
  assert list(_entry.config_roots([f"--config={t}/repo/configs/sub/b.py:x=1,y=2"])) == [repo]
  assert list(_entry.config_roots(["--workdir=w", "--config", f"{t}/repo/configs/a.py"])) == [repo]


def test_config_root_of_a_relative_path(tmp_path, monkeypatch):
  t = _tree(tmp_path)
  monkeypatch.chdir(t / "repo")
  assert list(_entry.config_roots(["--config=configs/a.py:local"])) == [str(t / "repo")]


def test_no_config_root_for_loose_missing_or_other_flags(tmp_path):
  t = _tree(tmp_path)
  assert not list(_entry.config_roots([f"--config={t}/loose/c.py"]))
  assert not list(_entry.config_roots([f"--config={t}/repo/configs/nope.py"]))
  assert not list(_entry.config_roots([f"--other={t}/repo/configs/a.py", "--config"]))
  assert not list(_entry.config_roots([f"--config.teacher.checkpoint={t}/repo/configs/a.py"]))


@pytest.mark.slow
def test_in_a_checkout_the_command_runs_the_checkouts_launcher(tmp_path):
  """From another directory, as a console script does: ``launch.inherit`` of this
  checkout (not a copy), its --help the launcher's docstring and flags."""
  code = ("import sys; sys.argv = ['inhernet-inherit', '--help']; from inhernet_jax import _entry; "
          "m = _entry.launcher('inherit'); print(m.__name__, m.__file__); _entry.inherit()")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.stdout.startswith(f"launch.inherit {ROOT / 'launch' / 'inherit.py'}"), proc.stdout[:300]
  assert "Inherits a teacher checkpoint" in proc.stdout and "--teacher" in proc.stdout, proc.stdout
