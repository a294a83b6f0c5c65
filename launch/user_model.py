r"""`inhernet-inherit --model=...`: inherit a user's own linen model from the command line.

  inhernet-inherit --config=configs/digits.py --model=my_pkg.my_module:MyModel \
      --params=CKPT_DIR --rank=8 --heads=3 --out=/tmp/inherited

``--model`` names a linen module class (or a function returning one) as
``package.module:Name``, built with ``--model_kwargs`` (JSON); ``--params`` (an alias of
``--teacher``) its trained variables: a run directory of `launch.main`, an orbax
CheckpointManager directory, or an orbax checkpoint of ``{"params"[, "batch_stats"]}``.
The config gives the data: the example input's shape (the model is read by one abstract
call, `inhernet_jax.inherit_model`) and the batches that re-estimate BatchNorm
statistics. ``--rank`` (int or fraction) or ``--energy`` with ``--heads`` set the spec;
the output layer is kept (``--nokeep_output`` factorises it). Writes ``OUT/checkpoints``
(the inherited variables, the user's names), ``OUT/export`` (safetensors and
``spec.json`` whose metadata holds the model and the inherited layers:
`student_from_export` rebuilds the student) and ``OUT/report.md`` / ``report.json``.
"""

import importlib
import inspect
import json
import os
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import app, flags

from inhernet_jax.data import pipeline as data
from inhernet_jax.decomposition.spec import InherSpec
from inhernet_jax.interop import export
from inhernet_jax.surgery import linen as surgery
from inhernet_jax.training import checkpoint as ckpt_lib
from . import recalibrate_flags, spec_flags

MODEL = flags.DEFINE_string(
    "model", None, "A linen model outside the zoo, package.module:Name (a class or a function "
    "returning a module), instead of the config's teacher; its checkpoint is --params.")
MODEL_KWARGS = flags.DEFINE_string("model_kwargs", "{}", "With --model: JSON keyword arguments.")
KEEP_OUTPUT = flags.DEFINE_bool(
    "keep_output", True, "With --model: keep the output layer (the last layer producing the "
    "model's output); --nokeep_output factorises it.")
if "teacher" in flags.FLAGS and "params" not in flags.FLAGS:  # Imported by launch.inherit.
  flags.DEFINE_alias("params", "teacher")


def load_model(target: str, kwargs_json: str = "{}"):
  """The module ``package.module:Name`` built with the JSON keyword arguments."""
  module_name, sep, attr = target.partition(":")
  if not sep or not module_name or not attr:
    raise app.UsageError(f"--model={target!r}: expected package.module:Name")
  try:
    kwargs = json.loads(kwargs_json)
  except json.JSONDecodeError as e:
    raise app.UsageError(f"--model_kwargs={kwargs_json!r}: not JSON ({e})") from None
  if os.getcwd() not in sys.path:
    sys.path.append(os.getcwd())  # `python -m` gives it; the console script does not.
  try:
    factory = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise app.UsageError(f"--model={target!r}: {e}") from None
  return factory(**kwargs)


def _variables(directory: str, abstract: dict) -> dict:
  try:
    return ckpt_lib.load_variables(directory, abstract)
  except ckpt_lib.CheckpointError as first:
    try:  # A plain orbax checkpoint of the variables (StandardCheckpointer).
      with ocp.StandardCheckpointer() as ckpt:
        wanted = {k: v for k, v in abstract.items() if k in ("params", "batch_stats")}
        return ckpt.restore(os.path.abspath(directory), wanted)
    except Exception:  # noqa: BLE001 - the first error is the informative one.
      raise first from None


def _spec() -> InherSpec:
  if spec_flags.BUDGET.value is not None:
    raise app.UsageError("--budget works with zoo models only; with --model give --rank or --energy")
  try:
    if spec_flags.ENERGY.value is not None:
      return InherSpec(energy=spec_flags.ENERGY.value, heads=spec_flags.HEADS.value,
                       rank_multiple=spec_flags.RANK_MULTIPLE.value)
    text = spec_flags.RANK.value
    rank = float(text) if "." in text else int(text)
    return InherSpec(rank=rank, heads=spec_flags.HEADS.value,
                     rank_multiple=spec_flags.RANK_MULTIPLE.value)
  except (TypeError, ValueError) as e:
    raise app.UsageError(f"--rank={spec_flags.RANK.value!r} / --heads / --energy: {e}") from None


def _view(saved):
  """A `Planned.view` from its JSON lists (None when the export has none)."""
  if not saved or saved[0] is None:
    return None
  ins, outs, perm = saved[0]
  return tuple(ins), tuple(outs), None if perm is None else tuple(perm)


def student_from_export(model, directory: str) -> surgery.InheritedModel:
  """The student of an ``OUT/export`` written by this launcher, around ``model``."""
  _, metadata = export.load_spec(os.path.join(directory, export.SPEC))
  planned = tuple(surgery.Planned(tuple(p[0]), int(p[1]), int(p[2]), _view(p[3:]))
                  for p in metadata["planned"])
  return surgery.InheritedModel(model=model, planned=planned)


def inherit(config, teacher_dir: str, out: str) -> None:
  """The whole command for ``--model``: read, inherit, recalibrate, write."""
  model = load_model(MODEL.value, MODEL_KWARGS.value)
  kwargs = {"train": False} if "train" in inspect.signature(model.__call__).parameters else {}
  x = jnp.zeros((1, *data.input_shape(config.data)),
                jnp.int32 if config.data.name == "chars" else jnp.float32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, **kwargs))
  variables = _variables(teacher_dir, abstract)
  spec = _spec()
  student, new_vars, rows = surgery.inherit_model(
      model, variables, spec, x, apply_kwargs=kwargs, keep_output=KEEP_OUTPUT.value,
      return_report=True)
  new_vars, recalibrated = recalibrate_flags.maybe_recalibrate(student, dict(new_vars), config)
  os.makedirs(out, exist_ok=True)
  mngr = ckpt_lib.manager(os.path.join(out, "checkpoints"), async_save=False)
  ckpt_lib.save(mngr, 0, new_vars, {"teacher": os.path.abspath(teacher_dir), "model": MODEL.value})
  mngr.wait_until_finished()
  mngr.close()
  planned = [[list(p.path), p.rank, p.heads, p.view] for p in student.planned]
  export.save(os.path.join(out, "export"), new_vars, spec, metadata={
      "model": MODEL.value, "model_kwargs": json.loads(MODEL_KWARGS.value), "planned": planned})
  print(export.save_report(out, rows, f"{MODEL.value} inherited", (f"teacher: {teacher_dir}",)))
  if recalibrated:
    print(recalibrated)
  print(f"written to {out}")
