"""Every bad input of `tests/bad_inputs.md` ends in one ``error:`` line (issue 28).

The table is the list of cases: each row's id has a driver here (and each driver a row),
and the row's last column is a fragment of the one line the driver must produce. The
drivers run the launchers' validate steps in-process (`preflight.check_run`, which
``launch.main.check`` is; the flag parsing of `launch.cli`; each launcher's ``check``),
faking a full disk or a read-only directory at the write, never filling a disk. Two
subprocesses check the real command path (absl's app.run, logging) end to end.
"""

import contextlib
import errno
import importlib
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest
from absl import flags

from configs import cifar100, digits
from inhernet_jax.experiment import preflight, runs
from launch import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "bad_inputs.md"
_SHARED = ("launch", "launch.cli")  # No flags of their own.


def _table() -> dict[str, str]:
  rows = {}
  for line in TABLE.read_text().splitlines():
    m = re.match(r"^\| `([a-z0-9_]+)` \|.*\| `(.+)` \|$", line)
    if m:
      rows[m.group(1)] = m.group(2)
  return rows


@contextlib.contextmanager
def launcher(name: str):
  """``launch.<name>`` imported alone among the launchers (they define clashing flags:
  --config, --out, ...), its flags unparsed; everything restored afterwards."""
  fv = flags.FLAGS
  keys = ("__flags", "__flags_by_module", "__flags_by_module_id", "__key_flags_by_module")
  saved = {k: {m: (list(v) if isinstance(v, list) else v) for m, v in fv.__dict__[k].items()}
           for k in keys}
  parsed = fv.is_parsed()
  before = {k: v for k, v in sys.modules.items() if k.startswith("launch.")}
  modules = {k: v for k, v in before.items() if k not in _SHARED}
  package = sys.modules.get("launch")
  attrs = dict(vars(package)) if package else {}
  try:
    for mod in modules:
      for flag in saved["__flags_by_module"].get(mod, ()):
        for n in (flag.name, flag.short_name):
          fv.__dict__["__flags"].pop(n, None)
      sys.modules.pop(mod)
      if package is not None:  # `from . import spec_flags` reads the package first.
        vars(package).pop(mod.split(".", 1)[1], None)
    fv.unparse_flags()
    module = importlib.import_module(f"launch.{name}")
    if hasattr(module, "define_flags"):
      module.define_flags()
    yield module
  finally:
    fv.unparse_flags()
    for k in keys:
      live = fv.__dict__[k]
      live.clear()
      live.update(saved[k])
    for k in [k for k in sys.modules if k.startswith("launch.")]:
      sys.modules.pop(k)
    sys.modules.update(before)
    if package:
      vars(package).clear()
      vars(package).update(attrs)
    if parsed:
      fv.mark_as_parsed()


def _line(capsys, fn, code=1) -> str:
  """The one stderr line of ``fn()`` run as a launcher's main (`cli.guarded`)."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.guarded(lambda argv: fn(), ["prog"])
  err = capsys.readouterr().err
  assert e.value.code == code, err
  assert "Traceback" not in err, err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  return lines[0]


def _config(edit):
  config = digits.get_config("local")
  edit(config)
  return config


def _check(edit):
  return lambda: preflight.check_run(_config(edit))


def _devices_plus():
  return 3 if jax.device_count() == 1 else jax.device_count() + 1


def _blocked(monkeypatch, name, error):
  """Makes ``name`` (os.open or os.write) fail with ``error`` for files in tmp_path."""
  real = getattr(os, name)

  def fake(target, *args, **kwargs):
    path = (target if isinstance(target, (str, os.PathLike))
            else os.readlink(f"/proc/self/fd/{target}"))
    if ".write-check-" in os.fspath(path):
      raise OSError(error, os.strerror(error), os.fspath(path))
    return real(target, *args, **kwargs)

  monkeypatch.setattr(os, name, fake)


def _no_tfds(monkeypatch):
  for mod in [m for m in sys.modules if m.split(".")[0] in ("tensorflow_datasets", "array_record")]:
    monkeypatch.delitem(sys.modules, mod)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  monkeypatch.setitem(sys.modules, "array_record", None)
  return lambda: preflight.check_run(cifar100.get_config())


def _raise(error):
  def fn():
    raise error
  return fn


def _wrapped_enospc():
  try:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/w/seed_0/teacher/checkpoints/3")
  except OSError as e:
    raise RuntimeError("async save failed") from e


def _tensorstore_enospc():
  """TensorStore's own report of a refused write (the text a real one gives, errno 28)."""
  path = "/w/seed_0/teacher/checkpoints/0.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp"
  raise ValueError(f'OUT_OF_RANGE: Error writing "step/0" in OCDBT database at local file '
                   f'"{path}/ocdbt.process_0/": Failed writing: "{path}/ocdbt.process_0/d/1f": '
                   "Failed to write 16709 bytes to file 11: No space left on device "
                   "[os_error_code='28']")


def _flags(name, *args):
  """Parses ``args`` for launcher ``name`` (`cli.parse`), then runs its validate step."""
  def fn():
    module = sys.modules[f"launch.{name}"]
    cli.parse(["prog", *args], module=module.__name__)
    if name == "main":
      return module.check(cli.load_config(module._CONFIG), flags.FLAGS.workdir)
    if name == "inherit":
      module.spec_flags.check()
      return module.check(cli.load_config(module._CONFIG))
    if name == "compare_init":
      return module.check(cli.load_config(module._CONFIG), flags.FLAGS.workdir)
    if name == "sentence_distill":
      return module.check(cli.load_config(flags.FLAGS["config"]))
    return module.check()
  return name, fn


def _cases(tmp_path, monkeypatch):
  """id -> (launcher to import or None, the failing call, exit code)."""
  inh = lambda *a: _flags("inherit", "--config=configs/digits.py:local", f"--teacher={tmp_path}",
                          f"--out={tmp_path / 'out'}", *a)
  file = tmp_path / "file"
  file.write_text("")
  (tmp_path / "locked" / ".lock").mkdir(parents=True)
  return {
      "recalibration_batches_0": _check(lambda c: setattr(
          c.method_defs.inherit, "recalibration_batches", 0)),
      "init_key_int": _check(lambda c: c.method_defs.inherit.update({"init_key": 5})),
      "fitnet_missing_layer": _check(lambda c: c.method_defs.student_fitnet.hint.update(
          {"student_layer": "nope"})),
      "student_kwargs_typo": _check(lambda c: c.method_defs.student.kwargs.update({"widthz": 3})),
      "heads_100000": _check(lambda c: setattr(c.method_defs.inherit, "heads", 100000)),
      "teacher_widths_zero": _check(lambda c: c.teacher.kwargs.update({"widths": (0, 0, 0)})),
      "unknown_data_name": _check(lambda c: setattr(c.data, "name", "mnistx")),
      "mesh_too_large": _check(lambda c: c.update({"mesh": {"data": _devices_plus()}})),
      "batch_size_100000": _check(lambda c: setattr(c, "batch_size", 100000)),
      "recalibrate_no": _check(lambda c: c.method_defs.inherit.update({"recalibrate": "no"})),
      "rank_1e9": _check(lambda c: setattr(c.method_defs.inherit, "rank", "1000000000")),
      "rank_student_larger": _check(lambda c: setattr(
          c.method_defs.inherit, "rank", "student:mlp")),
      "missing_data_extra": (None, lambda: _no_tfds(monkeypatch)()),
      "missing_extra_at_run": _raise(ModuleNotFoundError("No module named 'torch'", name="torch")),
      "workdir_is_file": lambda: preflight.check_workdir(str(file)),
      "lock_is_directory": lambda: preflight.check_workdir(str(tmp_path / "locked")),
      "workdir_read_only": (None, lambda: (_blocked(monkeypatch, "open", errno.EACCES),
                                           preflight.check_workdir(str(tmp_path / "ro")))),
      "disk_full": (None, lambda: (_blocked(monkeypatch, "write", errno.ENOSPC),
                                   preflight.check_workdir(str(tmp_path / "full")))),
      "disk_full_while_training": _wrapped_enospc,
      "disk_full_in_tensorstore": _tensorstore_enospc,
      "ctrl_c": ("main", lambda: cli.guarded(_interrupt, ["prog"], interrupted=_resume())),
      "unknown_config_key": _flags("main", "--config=configs/digits.py:local",
                                   f"--workdir={tmp_path}", "--config.epochz=3"),
      "bad_config_variant": _flags("main", "--config=configs/digits.py:nosuch",
                                   f"--workdir={tmp_path}"),
      "missing_workdir": _flags("main", "--config=configs/digits.py:local"),
      "missing_rank": inh(),
      "inherit_rank_1e9": inh("--rank=1000000000"),
      "inherit_student_larger": inh("--rank=student:mlp"),
      "inherit_bad_rank": inh("--rank=abc"),
      "inherit_recalibration_batches_0": inh("--rank=4", "--recalibration_batches=0"),
      "inherit_out_is_file": _flags("inherit", "--config=configs/digits.py:local",
                                    f"--teacher={tmp_path}", f"--out={file}", "--rank=4"),
      "inherit_missing_teacher": _flags("inherit", "--config=configs/digits.py:local",
                                        "--teacher=/nonexistent/teacher",
                                        f"--out={tmp_path / 'o'}", "--rank=4"),
      "convert_both_sources": _flags("convert", "--torchvision=resnet18", "--hf=vit",
                                     f"--weights={file}", f"--out={tmp_path / 'o'}"),
      "convert_two_spec_flags": _flags("convert", "--torchvision=resnet18", "--rank=8",
                                       "--energy=0.9", f"--weights={file}",
                                       f"--out={tmp_path / 'o'}"),
      "compare_init_bad_ranks": _flags("compare_init", "--config=configs/digits.py:local",
                                       f"--workdir={tmp_path}", "--ranks=4,x"),
      "effnet_bad_policy": _flags("inherit_effnet", "--policies=energy:1.5"),
      "sentence_zero_heads": _flags("sentence_distill", "--config=configs/minilm.py:local,heads=0",
                                    f"--workdir={tmp_path}"),
  }


def _interrupt(argv):
  raise KeyboardInterrupt


def _resume():
  return sys.modules["launch.main"].RESUME


def test_the_table_lists_every_case(tmp_path, monkeypatch):
  assert sorted(_table()) == sorted(_cases(tmp_path, monkeypatch))


@pytest.mark.parametrize("case", sorted(_table()))
def test_bad_input_is_one_line(case, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(ROOT)
  entry = _cases(tmp_path, monkeypatch)[case]
  name, fn = entry if isinstance(entry, tuple) else (None, entry)
  with launcher(name) if name else contextlib.nullcontext():
    code = 130 if case == "ctrl_c" else 1
    line = _line(capsys, fn, code)
  prefix = "interrupted: " if case == "ctrl_c" else "error: "
  assert line.startswith(prefix), line
  assert _table()[case] in line, line


@pytest.mark.parametrize("name, own", [
    ("main", ("--config", "--workdir")),
    ("inherit", ("--teacher", "--rank", "--heads", "--energy", "--budget", "--recalibrate")),
    ("convert", ("--torchvision", "--rank", "--heads", "--energy", "--budget", "--recalibrate")),
    ("compare_init", ("--ranks", "--recalibration_batches")),
    ("inherit_effnet", ("--policies", "--heads")),
    ("sentence_distill", ("--check_parity", "--workdir")),
])
def test_help_shows_the_commands_flags_and_exits_0(name, own, capsys):
  with launcher(name) as module:
    with pytest.raises(SystemExit) as e:
      cli.parse(["prog", "--help"], module=module.__name__)
  out = capsys.readouterr().out
  assert e.value.code == 0
  assert all(f"  {flag}" in out or f"  --[no]{flag[2:]}" in out for flag in own), out
  assert "--helpfull" in out and "--xla_" not in out and "--jax_" not in out


def test_heads_default_agrees_across_launchers():
  with launcher("inherit"):
    inherit = flags.FLAGS["heads"].default
  with launcher("inherit_effnet"):
    effnet = flags.FLAGS["heads"].default
  assert inherit == effnet == cli.DEFAULT_HEADS


def test_an_unexpected_error_says_it_is_a_bug(capsys):
  with pytest.raises(ZeroDivisionError):
    cli.guarded(lambda argv: 1 / 0, ["prog"])
  assert capsys.readouterr().err.startswith("error: internal error (ZeroDivisionError), a bug")


def test_train_and_evaluate_checks_before_its_lock(tmp_path):
  """The library entry point runs the same checks (nothing trained, no workdir)."""
  config = _config(lambda c: c.method_defs.inherit.update({"recalibrate": "no"}))
  with pytest.raises(preflight.ConfigError, match="recalibrate: expected true or false"):
    runs.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def _command(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_the_real_commands():
  """Through absl's app.run: a flag error is the only output (no logging before it) and
  --help exits 0 listing the shared flags."""
  bad = _command("launch.main", "--config=configs/digits.py:local", "--workdir=/tmp/unused",
                 "--config.epochz=3")
  assert bad.returncode == 1 and bad.stdout == "", bad
  (line,) = bad.stderr.splitlines()
  assert line.startswith("error: ") and _table()["unknown_config_key"] in line, bad.stderr
  helped = _command("launch.inherit", "--help")
  assert helped.returncode == 0 and "--rank:" in helped.stdout and "--heads:" in helped.stdout


def test_a_failed_check_is_not_preceded_by_what_its_probing_logged(capsys):
  """`cli.quiet` (the checks before any work): a library's warning logged while probing
  (tfds: "Variant folder ... has no dataset_info.json", before the data check's error)
  does not come before the one ``error:`` line; when the checks pass it is still shown."""
  import logging

  handler = logging.StreamHandler(sys.stderr)
  root = logging.getLogger()
  root.addHandler(handler)

  def check(fail):
    with cli.quiet():
      logging.getLogger("probe").warning("Variant folder x has no dataset_info.json")
      logging.getLogger("probe").info("probing the backends")
      if fail:
        raise preflight.ConfigError("config.data: cifar100 is not prepared")

  try:
    assert _line(capsys, lambda: check(True)) == "error: config.data: cifar100 is not prepared"
    check(False)
    err = capsys.readouterr().err
  finally:
    root.removeHandler(handler)
  assert err == "Variant folder x has no dataset_info.json\n", err
