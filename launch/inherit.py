r"""Inherits a teacher checkpoint from the command line: inherited checkpoint + report.

  python -m launch.inherit --config=configs/digits.py \
      --teacher=workdir/digits/seed_0/teacher --rank=8 --heads=3 --out=/tmp/inherited
  python -m launch.inherit --config=configs/cifar100.py:pair=resnet56 \
      --teacher=RUN_DIR --rank=student:resnet20 --out=...    # at resnet20's size
  python -m launch.inherit ... --energy=0.9                  # per-layer ranks by energy
  python -m launch.inherit ... --budget=student:resnet20     # per-layer ranks at its size
  python -m launch.inherit ... --norecalibrate               # keep the teacher's BN statistics

Installed (``pip install``), the same command is ``inhernet-inherit``, with the same flags.

The teacher's architecture comes from the config (``config.teacher``), the checkpoint
from ``--teacher`` (a run directory of `launch.main` or an orbax CheckpointManager
directory). Writes ``OUT/checkpoints`` (an orbax checkpoint with ``params`` and the
teacher's ``batch_stats``, loadable with `inhernet_jax.training.checkpoint.load_variables`),
``OUT/spec.json`` (the exact per-layer spec, to rebuild the model, with the model's name
and classes as metadata: `inhernet_jax.interop.export.load_spec`) and
``OUT/report.md`` / ``report.json`` (per layer: rank, heads, energy kept, error, params).
A network with BatchNorm gets its statistics re-estimated on training batches of the
config's data (`launch.recalibrate_flags`: ``--recalibrate``, ``--recalibration_batches``).
"""

import os

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from inhernet_jax import models
from inhernet_jax.decomposition import accounting
from inhernet_jax.training import checkpoint as ckpt_lib
from inhernet_jax.training import lock
from inhernet_jax.data import pipeline as data
from inhernet_jax.interop import export
from inhernet_jax.decomposition.transform import format_report, inherit
from inhernet_jax.experiment import preflight, validate
from . import cli, recalibrate_flags, spec_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The experiment config naming the teacher.")
_TEACHER = flags.DEFINE_string("teacher", None, "Teacher run directory or checkpoint directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not hold a checkpoint yet).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "Classifier size (default: the dataset's).")
_ALLOW_UNFINISHED = flags.DEFINE_bool(
    "allow_unfinished", False, "Inherit from a teacher run that has not finished (its latest step).")
flags.mark_flags_as_required(["config", "teacher", "out"])

# A user's own model (launch/user_model.py): --model=pkg.module:Name, --params=CKPT_DIR
# (an alias of --teacher, so defined after it).
from . import user_model  # noqa: E402


flags.adopt_module_key_flags(spec_flags)  # --help lists them with this command's own.
flags.adopt_module_key_flags(recalibrate_flags)
flags.adopt_module_key_flags(user_model)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  spec_flags.check()  # The flags' syntax, before the config is even read.
  config = cli.load_config(_CONFIG)
  if user_model.MODEL.value:  # A model outside the zoo (launch/user_model.py).
    with cli.quiet():
      recalibrate_flags.check(config)
      preflight.check_workdir(os.path.abspath(_OUT.value), "--out", create=False)
    return user_model.inherit(config, _TEACHER.value, os.path.abspath(_OUT.value))
  with cli.quiet():  # Its one-line error first, if any.
    checked = check(config)
  _inherit(config, *checked)


def check(config):
  """Every flag and the config's teacher and data, before anything is loaded or written:
  ``(teacher model, its abstract variables, num_classes, input shape, input dtype)``.

  Raises:
    app.UsageError, validate.ConfigError: naming the flag or field and what was expected.
  """
  spec_flags.check()
  recalibrate_flags.check(config)
  p = validate._Problems()  # pylint: disable=protected-access
  name = config.get("teacher", {}).get("model")
  p.check(name in models.NAMES, f"config.teacher.model: unknown model {name!r}; known: "
                                f"{', '.join(models.NAMES)}")
  shape = p.call("config.data", data.input_shape, config.get("data") or {})
  if _NUM_CLASSES.value is not None and _NUM_CLASSES.value < 1:
    raise app.UsageError(f"--num_classes={_NUM_CLASSES.value}: expected an int >= 1")
  validate._raise(p)  # pylint: disable=protected-access
  num_classes = _NUM_CLASSES.value or data.num_classes(config.data)
  dtype = jnp.int32 if config.data.name == "chars" else jnp.float32
  x = jax.ShapeDtypeStruct((1, *shape), dtype)
  teacher, abstract = preflight.build_model(p, "config.teacher", name, config.teacher.get("kwargs"),
                                            num_classes, x)
  validate._raise(p)  # pylint: disable=protected-access
  if not os.path.exists(_TEACHER.value):
    raise FileNotFoundError(f"--teacher={_TEACHER.value}: no such directory (expected a run "
                            "directory of launch.main or an orbax checkpoint directory)")
  out = os.path.abspath(_OUT.value)
  if os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
    raise app.UsageError(f"--out={out} already holds a checkpoint; choose another directory")
  spec_flags.check(abstract["params"], name, num_classes)
  preflight.check_workdir(out, "--out", create=False)
  return teacher, abstract, num_classes, (1, *shape), dtype


def _inherit(config, teacher, abstract, num_classes, shape, dtype):
  out = os.path.abspath(_OUT.value)
  name = config.teacher.model
  status = ckpt_lib.run_status(_TEACHER.value)
  if status["finished"] is False and not _ALLOW_UNFINISHED.value:
    raise app.UsageError(
        f"--teacher={_TEACHER.value} is unfinished: its latest checkpoint is step "
        f"{status['step']} of {status['total_steps']}; let it finish, or pass "
        "--allow_unfinished to inherit from that step")
  if status["finished"] is None:
    print(f"note: {status['directory']} does not record its run's length (step {status['step']}); "
          "cannot tell whether that run finished")
  elif not status["finished"]:
    print(f"note: inheriting from step {status['step']} of {status['total_steps']} (unfinished)")
  variables = ckpt_lib.load_variables(_TEACHER.value, abstract)
  spec = spec_flags.make_spec(variables["params"], name, num_classes)
  params, rows = inherit(variables["params"], spec, return_report=True)
  # The inherited variables, checked against the inherited model's own tree.
  student = teacher.clone(spec=spec)
  expect = jax.eval_shape(lambda: student.init(jax.random.key(0), jnp.zeros(shape, dtype), train=False))
  got = {"params": params, **({"batch_stats": variables["batch_stats"]} if "batch_stats" in variables else {})}
  jax.tree.map(lambda a, b: None, {k: expect[k] for k in got}, got)  # Same tree or raise.
  got, recalibrated = recalibrate_flags.maybe_recalibrate(student, got, config)
  stats_note = recalibrated or ("the teacher's" if "batch_stats" in got else "none")
  # load_variables refused a NaN/Inf teacher; nothing non-finite is written either way.
  ckpt_lib.check_finite(got, f"the network inherited from {_TEACHER.value}")
  with lock.WorkdirLock(out):  # One writer: a second run at once is refused, not interleaved.
    _write(out, got, spec, rows, name, num_classes, status, stats_note)
  text = format_report(rows)
  print(text)
  if recalibrated:
    print(recalibrated)
  before, after = accounting.param_count(variables["params"]), accounting.param_count(params)
  print(f"whole network: teacher {before:,} parameters -> inherited {after:,} ({after / before:.1%}); written to {out}")


def _write(out, got, spec, rows, name, num_classes, status, stats_note):
  if os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
    raise app.UsageError(f"--out={out} already holds a checkpoint; choose another directory")
  mngr = ckpt_lib.manager(os.path.join(out, "checkpoints"), async_save=False)
  ckpt_lib.save(mngr, 0, got, {"teacher": os.path.abspath(_TEACHER.value), "model": name,
                               "teacher_step": status["step"]})
  mngr.wait_until_finished()
  mngr.close()
  export.save_spec(os.path.join(out, "spec.json"), spec, metadata={
      "model": name, "num_classes": num_classes, "teacher": os.path.abspath(_TEACHER.value),
      **({"batch_stats": stats_note} if "batch_stats" in got else {})})
  export.save_report(out, rows, f"{name} inherited",
                     (f"teacher: {_TEACHER.value}", f"batch_stats: {stats_note}"))


if __name__ == "__main__":
  cli.run(main, interrupted="nothing was written to --out unless it printed 'written to'; "
          "run the same command again")
