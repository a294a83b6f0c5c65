"""Untrusted files (issue 28): every bad input tried is one clear error, before any work.

Each case builds one bad file (a weights file, a HF ``config.json`` or index, a
``spec.json``, a checkpoint) and checks that it is refused with the error that
``tests/bad_files.md`` lists for it: the table is read here, and must list exactly the
cases run, so the two cannot drift. ``launch.convert`` cases run its ``main`` (its one
``error:`` line on stderr, exit status 1, no other exception); one runs it as a command.
NaN/Inf teachers, the meta file's integrity and ``launch.inherit``'s lock run the
commands as subprocesses (scripted: a lock is held by this process, no sleeps).
"""

import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from absl import flags
from absl.testing import flagsaver

from inhernet_jax import InherSpec, models
from inhernet_jax.interop import export
from inhernet_jax.training import checkpoint
from inhernet_jax.training import integrity
from inhernet_jax.training import lock
from inhernet_jax.training import teardown
from inhernet_jax.training import trainer as train_lib

import launcher_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "bad_files.md"
X = jnp.zeros((1, 8, 8, 1), jnp.float32)
LOCAL = (8, 16, 32)  # configs/digits.py:local teacher widths.


def _table() -> dict[str, str]:
  """``case -> expected fragment`` of tests/bad_files.md."""
  rows = {}
  for line in TABLE.read_text().splitlines():
    m = re.match(r"^\| `([a-z0-9_]+)` \| .* \| `(.+)` \|$", line)
    if m:
      assert m.group(1) not in rows, f"{m.group(1)} twice in {TABLE}"
      rows[m.group(1)] = m.group(2).replace("\\|", "|")
  return rows


EXPECTED = _table()


# --------------------------------------------------------------------- bad files
class _Payload:
  """Unpickling it would run a shell command (it must never run)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _safetensors(path, header, data=b""):
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _torch_payload(path):
  torch = pytest.importorskip("torch")
  torch.save({"conv1.weight": _Payload(path.parent / "PWNED")}, path)


def _raw_pickle(path):
  with open(path, "wb") as f:
    pickle.dump({"conv1.weight": _Payload(path.parent / "PWNED")}, f)


def _truncated(path):
  torch = pytest.importorskip("torch")
  torch.save({"conv1.weight": torch.ones(4, 3, 7, 7)}, path)
  path.write_bytes(path.read_bytes()[:200])


def _list_pth(path):
  torch = pytest.importorskip("torch")
  torch.save([torch.ones(2)], path)


def _nan_weight(path):
  w = np.ones((4, 3, 7, 7), np.float32)
  w[0, 0, 0, 0] = np.nan
  safetensors.numpy.save_file({"conv1.weight": w}, str(path))


def _int_weight(path):
  safetensors.numpy.save_file({"conv1.weight": np.ones((4, 3, 7, 7), np.int32)}, str(path))


# name -> (file name, how to write it) of torchvision weights files (--torchvision=resnet18).
WEIGHTS = {
    "pickle_payload": ("model.pth", _torch_payload),
    "pickle_raw": ("model.pth", _raw_pickle),
    "pth_truncated": ("model.pth", _truncated),
    "pth_not_a_state_dict": ("model.pth", _list_pth),
    "safetensors_header_too_large": (
        "model.safetensors", lambda p: p.write_bytes(struct.pack("<Q", 2**40) + b"{}")),
    "safetensors_offsets_beyond_file": ("model.safetensors", lambda p: _safetensors(
        p, {"conv1.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 4)),
    "safetensors_header_not_json": (
        "model.safetensors", lambda p: _safetensors(p, b"{not json")),
    "safetensors_empty": ("model.safetensors", lambda p: p.write_bytes(b"")),
    "safetensors_unknown_dtype": ("model.safetensors", lambda p: _safetensors(
        p, {"conv1.weight": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)),
    "safetensors_shape_overflow": ("model.safetensors", lambda p: _safetensors(
        p, {"conv1.weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}},
        b"\0" * 4)),
    "safetensors_deep_header": (
        "model.safetensors", lambda p: _safetensors(p, b"[" * 100_000 + b"]" * 100_000)),
    "unknown_suffix": ("weights.npz", lambda p: np.savez(p, w=np.ones(3))),
    "no_suffix": ("weights", lambda p: p.write_bytes(b"\0" * 64)),
    "nan_weight": ("model.safetensors", _nan_weight),
    "int_weight": ("model.safetensors", _int_weight),
    "weights_missing": ("absent.pth", lambda p: None),
    "weights_is_a_directory": ("dir.pth", lambda p: p.mkdir()),
}

_VIT = {"model_type": "vit", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "image_size": 8, "patch_size": 4, "num_labels": 3}


def _vit_state():
  """A tiny HF ViT without a classifier (``ViTModel``: --init_head adds one)."""
  rng = np.random.default_rng(0)
  state = {"vit.embeddings.cls_token": (1, 1, 8), "vit.embeddings.position_embeddings": (1, 5, 8),
           "vit.embeddings.patch_embeddings.projection.weight": (8, 3, 4, 4),
           "vit.embeddings.patch_embeddings.projection.bias": (8,),
           "vit.layernorm.weight": (8,), "vit.layernorm.bias": (8,)}
  layer = "vit.encoder.layer.0"
  for name, shape in (("attention.attention.query", (8, 8)), ("attention.attention.key", (8, 8)),
                      ("attention.attention.value", (8, 8)), ("attention.output.dense", (8, 8)),
                      ("intermediate.dense", (16, 8)), ("output.dense", (8, 16))):
    state[f"{layer}.{name}.weight"], state[f"{layer}.{name}.bias"] = shape, shape[:1]
  for norm in ("layernorm_before", "layernorm_after"):
    state[f"{layer}.{norm}.weight"] = state[f"{layer}.{norm}.bias"] = (8,)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in state.items()}


def _deep(n):
  return "[" * n + "]" * n


# name -> (config.json text or object, index.json or None) of HF ViT directories
# (--hf=vit --init_head).
HF = {
    "hf_num_labels_huge": ({**_VIT, "num_labels": 200_000_000}, None),
    "hf_num_labels_float": ({**_VIT, "num_labels": 2e8}, None),
    "hf_id2label_huge": ({**_VIT, "id2label": {str(i): "x" for i in range(100_001)}}, None),
    "hf_hidden_size_huge": ({**_VIT, "hidden_size": 2**30}, None),
    "hf_intermediate_size_huge": ({**_VIT, "intermediate_size": 2**40}, None),
    "hf_heads_huge": ({**_VIT, "num_attention_heads": 4096}, None),
    "hf_image_size_huge": ({**_VIT, "image_size": 10**6}, None),
    "hf_layers_huge": ({**_VIT, "num_hidden_layers": 10**6}, None),
    "hf_config_deep": (_deep(200_000), None),
    "hf_config_not_utf8": (b'{"model_type": "vi\xff"}', None),
    "hf_config_not_an_object": ("[1, 2]", None),
    "hf_index_deep": (_VIT, _deep(200_000)),
    "hf_index_outside": (_VIT, {"weight_map": {"x": "../outside.safetensors"}}),
}


def _hf_dir(path, config, index):
  path.mkdir(parents=True)
  if index is None:
    safetensors.numpy.save_file(_vit_state(), str(path / "model.safetensors"))
  else:
    safetensors.numpy.save_file(_vit_state(), str(path / "part-1.safetensors"))
    text = index if isinstance(index, str) else json.dumps(index)
    (path / "model.safetensors.index.json").write_text(text)
  raw = config if isinstance(config, bytes) else (
      config if isinstance(config, str) else json.dumps(config)).encode()
  (path / "config.json").write_bytes(raw)
  return path


_SPEC = export.spec_to_json(InherSpec(rank=4, heads=2))


def _spec_file(path, spec=None, text=None):
  if text is None:
    text = json.dumps({"format": export.FORMAT, "version": export.VERSION,
                       "spec": {**_SPEC, **(spec or {})}, "metadata": {}})
  path.write_bytes(text if isinstance(text, bytes) else text.encode())
  return path


# name -> spec.json (export.load_spec: one ValueError).
SPECS = {
    "spec_heads_huge": {"spec": {"heads": 10**9, "skip_if_no_saving": False}},
    "spec_rank_huge": {"spec": {"rank": 10**9}},
    "spec_oversample_huge": {"spec": {"oversample": 10**9}},
    "spec_rule_heads_huge": {"spec": {"rules": [["fc/kernel", {"heads": 10**9}]]}},
    "spec_rule_rank_huge": {"spec": {"rules": [["fc/kernel", {"rank": 10**9}]]}},
    "spec_deep": {"text": '{"format": "inhernet_jax.interop.export", "version": 1, '
                          '"metadata": {"a": ' + _deep(200_000) + "}}"},
    "spec_not_utf8": {"text": b'{"format": "\xff"}'},
    "spec_metadata_deep": {"text": '{"format": "inhernet_jax.interop.export", "version": 1, '
                                   '"spec": null, "metadata": {"a": ' + _deep(100) + "}}"},
}


def test_the_table_lists_exactly_the_cases_run():
  run = set(WEIGHTS) | set(HF) | set(SPECS) | set(CHECKPOINTS)
  assert set(EXPECTED) == run, (sorted(set(EXPECTED) - run), sorted(run - set(EXPECTED)))


# ------------------------------------------------------------------ launch.convert
@pytest.fixture
def convert_main():
  from launch import convert as launch_convert  # Defines its flags.

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return launch_convert.main


def _one_error_line(convert_main, capsys, **flag_values):
  """``launch.convert``'s stderr: one ``error:`` line, exit status 1, nothing raised."""
  capsys.readouterr()
  with flagsaver.flagsaver(**flag_values):
    with pytest.raises(SystemExit) as exit_info:
      convert_main(["convert"])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and err.startswith("error: "), err[-2000:]
  assert "Traceback" not in err
  return lines[0]


@pytest.mark.parametrize("case", sorted(WEIGHTS))
def test_bad_weights_files_are_one_error_line(case, convert_main, capsys, tmp_path):
  name, write = WEIGHTS[case]
  path = tmp_path / name
  write(path)
  out = tmp_path / "out"
  line = _one_error_line(convert_main, capsys, torchvision="resnet18", weights=str(path),
                         out=str(out), rank="0.5")
  assert EXPECTED[case] in line, line
  assert str(path) in line, line  # Names the file.
  assert not (tmp_path / "PWNED").exists()  # No pickled code ran.
  assert not out.exists()


@pytest.mark.parametrize("case", sorted(HF))
def test_bad_hf_configs_and_indexes_are_one_error_line(case, convert_main, capsys, tmp_path):
  config, index = HF[case]
  model_dir = _hf_dir(tmp_path / "model", config, index)
  (tmp_path / "outside.safetensors").write_bytes(b"")
  line = _one_error_line(convert_main, capsys, hf="vit", init_head=True,
                         weights=str(model_dir), out=str(tmp_path / "out"))
  assert EXPECTED[case] in line, line
  assert not (tmp_path / "out").exists()


def test_a_good_tiny_vit_converts(convert_main, capsys, tmp_path):
  """The bad HF cases above differ from a working directory only by their bad field."""
  model_dir = _hf_dir(tmp_path / "model", _VIT, None)
  with flagsaver.flagsaver(hf="vit", init_head=True, weights=str(model_dir),
                           out=str(tmp_path / "out")):
    convert_main(["convert"])
  variables, spec = export.load(tmp_path / "out")
  assert spec is None and variables["params"]["head"]["kernel"].shape == (8, 3)


def test_launch_convert_command_prints_one_line_for_a_pickle_payload(tmp_path):
  _torch_payload(tmp_path / "model.pth")
  proc = subprocess.run(
      [sys.executable, "-m", "launch.convert", "--torchvision=resnet18",
       f"--weights={tmp_path / 'model.pth'}", f"--out={tmp_path / 'out'}"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  _command_error(proc, EXPECTED["pickle_payload"])
  assert not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------- spec.json
@pytest.mark.parametrize("case", sorted(SPECS))
def test_bad_spec_files_are_one_value_error(case, tmp_path):
  path = _spec_file(tmp_path / "spec.json", SPECS[case].get("spec"), SPECS[case].get("text"))
  with pytest.raises(ValueError) as info:  # Documented: ValueError (never RecursionError).
    export.load_spec(path)
  assert type(info.value) is ValueError
  assert EXPECTED[case] in str(info.value) and str(path) in str(info.value), str(info.value)


def test_specs_within_the_bounds_still_load(tmp_path):
  spec = {"heads": export.MAX_HEADS, "rank": export.MAX_RANK,
          "rules": [["fc/kernel", {"heads": 3, "rank": 8}]]}
  loaded, _ = export.load_spec(_spec_file(tmp_path / "spec.json", spec))
  assert (loaded.heads, loaded.rank) == (export.MAX_HEADS, export.MAX_RANK)


# ------------------------------------------------------------------- checkpoints
def _env():
  return launcher_env.env()


def _command_error(proc, *fragments):
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  for f in fragments:
    assert f in lines[0], lines[0]
  return lines[0]


def _save_run(run_dir, params, steps=(0,), history=None):
  """A launch.main-style run directory: a TrainState checkpoint per step."""
  model = models.create("cnn", num_classes=10, widths=LOCAL)
  mngr = checkpoint.manager(run_dir / "checkpoints", max_to_keep=None)
  for step in steps:
    state = train_lib.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.adam(1e-3))
    checkpoint.save(mngr, step, state, {"history": history or {"step": step}})
  mngr.wait_until_finished()
  mngr.close()


def _teacher_params(nan_at=None):
  model = models.create("cnn", num_classes=10, widths=LOCAL)
  params = model.init(jax.random.key(0), X, train=False)["params"]
  if nan_at:
    path = nan_at.split("/")
    leaf = params
    for k in path[:-1]:
      leaf = leaf[k]
    leaf[path[-1]] = leaf[path[-1]].at[0].set(jnp.nan)
  return model, params


def _abstract(model):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), X, train=False))


def _edit_meta(run_dir, step, edit):
  """Edits the meta file of ``step`` in place (``edit`` may return a whole new value)."""
  path = run_dir / "checkpoints" / str(step) / "meta" / "metadata"
  meta = json.loads(path.read_text())
  replaced = edit(meta)
  path.write_text(json.dumps(meta if replaced is None else replaced))


def _not_an_object(meta):
  return [1, 2]


def _step_1_copied_as_2(run_dir):
  """An older step presented as the latest: step 2's directory replaced by step 1's
  (every file intact, its digest and checksums valid)."""
  ckpts = run_dir / "checkpoints"
  shutil.rmtree(ckpts / "2")
  shutil.copytree(ckpts / "1", ckpts / "2")


def _remove_digest_edit_history(meta):
  del meta["meta_digest"]
  meta["history"] = {"step": 99, "test_accuracy": [0.99]}


def _other_algorithm(meta):  # Re-digested: only the algorithm's name can be the cue.
  meta["checksum"]["algorithm"] = "none"
  meta["checksum"]["leaves"] = {}
  meta.pop("meta_digest")
  meta["meta_digest"] = integrity.digest(meta)


def _no_checksum(meta):
  del meta["checksum"]
  meta.pop("meta_digest")
  meta["meta_digest"] = integrity.digest(meta)


# name -> how the latest step's meta file is edited.
CHECKPOINTS = {
    "meta_digest_removed_history_edited": _remove_digest_edit_history,
    "checksum_algorithm_changed": _other_algorithm,
    "checksum_removed": _no_checksum,
    "meta_not_an_object": _not_an_object,
    "step_directory_replaced": _step_1_copied_as_2,  # Takes the run directory.
    "teacher_nan": None,  # A teacher whose params hold NaN (saved with valid checksums).
}


@pytest.mark.parametrize("case", [c for c in sorted(CHECKPOINTS) if CHECKPOINTS[c]])
def test_an_edited_meta_file_is_detected(case, tmp_path):
  model, params = _teacher_params()
  _save_run(tmp_path, params, steps=(1, 2))
  if CHECKPOINTS[case] is _step_1_copied_as_2:
    _step_1_copied_as_2(tmp_path)
  else:
    _edit_meta(tmp_path, 2, CHECKPOINTS[case])
  # Loading the edited step: one error naming why.
  with pytest.raises(checkpoint.CheckpointError, match=re.escape(EXPECTED[case])):
    checkpoint.load_variables(tmp_path, _abstract(model))
  # Resuming: the edited step is not used; the run falls back to the intact step 1.
  state = train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
  mngr = checkpoint.manager(tmp_path / "checkpoints")
  step, _, meta = checkpoint.restore_latest(mngr, state)
  mngr.close()
  assert step == 1 and meta["history"] == {"step": 1}
  assert (tmp_path / "checkpoints.corrupt" / "2").is_dir()


def _late_reads(monkeypatch, caplog):
  """What arrives after a failed orbax run: TensorStore callbacks into a closed loop
  (sys.unraisablehook) and asyncio's "never retrieved" / "destroyed but pending"."""
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(str(u.exc_value)))
  caplog.set_level("ERROR", logger="asyncio")
  return lambda: unraisable + [r.getMessage() for r in caplog.records if r.name == "asyncio"]


def test_a_read_in_flight_when_orbax_fails_ends_quietly(monkeypatch, caplog):
  """Deterministic: orbax's ``run_sync`` fails while a TensorStore read is in flight (a
  promise this test fulfils afterwards); the loop drains its tasks before closing, so
  the late read has no closed loop to call into (before: "Event loop is closed")."""
  import asyncio
  import tensorstore as ts
  from orbax.checkpoint._src import asyncio_utils

  late = _late_reads(monkeypatch, caplog)
  promise, future = ts.Promise.new()

  async def restore():
    asyncio.ensure_future(future)  # Another array's read, still in flight.
    await asyncio.sleep(0)
    raise ValueError("one array cannot be read")

  with pytest.raises(ValueError, match="one array cannot be read"):  # Still raised.
    asyncio_utils.run_sync(restore())
  promise.set_result(1)
  del future
  assert late() == []


def test_only_a_read_finishing_into_its_closed_loop_is_not_printed(monkeypatch):
  """`teardown.late_read` recognises the real one (TensorStore's callback into a closed
  loop, made here deterministically) and not the same error raised anywhere else."""
  import asyncio
  import tensorstore as ts
  from inhernet_jax.training import teardown

  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  loop = asyncio.new_event_loop()
  promise, future = ts.Promise.new()

  async def read():
    await future

  loop.run_until_complete(asyncio.sleep(0, loop.create_task(read())))  # Now awaiting.
  loop.close()
  promise.set_result(1)  # Completes into the closed loop.

  class Elsewhere:
    def __del__(self):
      raise RuntimeError("Event loop is closed")

  Elsewhere()
  assert len(seen) == 2, seen
  assert teardown.late_read(seen[0]) and not teardown.late_read(seen[1])
  passed = []
  hook = teardown._Hook(passed.append)
  hook(seen[0])
  hook(seen[1])
  assert passed == [seen[1]]


def test_a_restore_failing_mid_read_falls_back_without_late_tracebacks(
    tmp_path, monkeypatch, caplog):
  """The real path: step 2's array data deleted, so its restore fails while the other
  arrays are being read; each of four resumes falls back to step 1 and prints nothing
  late (before: dozens of "Event loop is closed" tracebacks in about one run of two)."""
  model, params = _teacher_params()
  _save_run(tmp_path / "base", params, steps=(1, 2))
  state = train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
  late = _late_reads(monkeypatch, caplog)
  for i in range(4):
    run = tmp_path / str(i)
    shutil.copytree(tmp_path / "base", run)
    for f in (run / "checkpoints" / "2" / "state" / "d").iterdir():
      f.unlink()
    mngr = checkpoint.manager(run / "checkpoints")
    step, _, _ = checkpoint.restore_latest(mngr, state)
    mngr.close()
    assert step == 1
  assert late() == []


@pytest.mark.parametrize("launcher", ["inherit", "main"])
def test_a_nan_teacher_is_named_before_anything_is_written_or_trained(tmp_path, launcher):
  _, params = _teacher_params(nan_at="head/bias")
  teacher, out = tmp_path / "teacher", tmp_path / "out"
  _save_run(teacher, params)
  flags = {"inherit": [f"--teacher={teacher}", "--rank=4", f"--out={out}"],
           "main": [f"--config.teacher.checkpoint={teacher}", f"--workdir={out}"]}[launcher]
  proc = subprocess.run(
      [sys.executable, "-m", f"launch.{launcher}", "--config=configs/digits.py:local", *flags],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  _command_error(proc, EXPECTED["teacher_nan"], "params/head/bias (1 NaN/Inf)",
                 *([str(teacher)] if launcher == "main" else []))
  assert not re.search(r"epoch \d+:", proc.stdout + proc.stderr)  # Nothing trained.
  assert not list(out.rglob("checkpoints"))


def test_launch_inherit_out_is_locked(tmp_path):
  _, params = _teacher_params()
  _save_run(tmp_path / "teacher", params)
  out = tmp_path / "out"
  with lock.WorkdirLock(out):  # Another writer holds --out (this process: no sleeps).
    proc = subprocess.run(
        [sys.executable, "-m", "launch.inherit", "--config=configs/digits.py:local",
         f"--teacher={tmp_path / 'teacher'}", "--rank=4", f"--out={out}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  _command_error(proc, "is in use by pid", str(out))
  assert not (out / "checkpoints").exists()


# ------------------------------------------------------------------------ exports
def test_exports_follow_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    export.save(tmp_path / "e", {"params": {"w": np.ones(3, np.float32)}}, None)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "e").iterdir()}
    os.umask(0o027)
    export.save_spec(tmp_path / "spec.json", None)
    group_only = stat.S_IMODE((tmp_path / "spec.json").stat().st_mode)
  finally:
    os.umask(old)
  assert modes == {export.WEIGHTS: 0o644, export.SPEC: 0o644}
  assert group_only == 0o640


def test_ctrl_c_while_a_checkpoint_is_written_lands_after_it():
  # What the loop's last wait and every save do (teardown.ctrl_c_deferred): a SIGINT that
  # arrives inside the block is held until the block (the save) has finished, then raised;
  # a second one interrupts at once; the handler before is back either way.
  assert threading.current_thread() is threading.main_thread()  # Signals reach this thread.
  before = signal.getsignal(signal.SIGINT)
  finished = []
  with pytest.raises(KeyboardInterrupt):
    with teardown.ctrl_c_deferred():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)  # The handler runs here (the main thread's next bytecodes).
      finished.append("save")
  assert finished == ["save"] and signal.getsignal(signal.SIGINT) is before
  with pytest.raises(KeyboardInterrupt):
    with teardown.ctrl_c_deferred():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again: a save that hangs is left.
      time.sleep(0.01)
      finished.append("not reached")
  assert finished == ["save"] and signal.getsignal(signal.SIGINT) is before
