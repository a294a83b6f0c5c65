r"""Inherits a teacher checkpoint from the command line: inherited checkpoint + report.

  python -m launch.inherit --config=configs/digits.py \
      --teacher=workdir/digits/seed_0/teacher --rank=8 --heads=3 --out=/tmp/inherited
  python -m launch.inherit --config=configs/cifar100.py:pair=resnet56 \
      --teacher=RUN_DIR --rank=params:resnet20 --out=...     # at resnet20's size
  python -m launch.inherit ... --energy=0.9                  # per-layer ranks by energy

The teacher's architecture comes from the config (``config.teacher``), the checkpoint
from ``--teacher`` (a run directory of `launch.main` or an orbax CheckpointManager
directory). Writes ``OUT/checkpoints`` (an orbax checkpoint with ``params`` and the
teacher's ``batch_stats``, loadable with `inhernet_jax.checkpoint.load_variables`),
``OUT/spec.json`` (the exact per-layer spec, to rebuild the model) and
``OUT/report.md`` / ``report.json`` (per layer: rank, heads, energy kept, error, params).
"""

import json
import os

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from inhernet_jax import accounting, models
from inhernet_jax import checkpoint as ckpt_lib
from inhernet_jax import data
from inhernet_jax.inherit import format_report, inherit, resolve
from inhernet_jax.spec import InherSpec

_CONFIG = config_flags.DEFINE_config_file("config", None, "The experiment config naming the teacher.")
_TEACHER = flags.DEFINE_string("teacher", None, "Teacher run directory or checkpoint directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not hold a checkpoint yet).")
_RANK = flags.DEFINE_string(
    "rank", None, "An int, a fraction in (0, 1], or params:<zoo model> (that model's size).")
_ENERGY = flags.DEFINE_float("energy", None, "Instead of --rank: spectral energy to keep per layer.")
_HEADS = flags.DEFINE_integer("heads", 3, "Gated expert up-projections H.")
_PRESET = flags.DEFINE_enum("preset", "default", models.PRESETS, "Which layers are inherited.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "Classifier size (default: the dataset's).")
flags.mark_flags_as_required(["config", "teacher", "out"])


def _spec(teacher_params, name: str, num_classes: int) -> InherSpec:
  rules = models.preset(_PRESET.value, name)
  if _ENERGY.value is not None:
    return resolve(teacher_params, InherSpec(energy=_ENERGY.value, heads=_HEADS.value, rules=rules))
  rank = _RANK.value
  if rank.startswith("params:"):
    other = rank.split(":", 1)[1]
    if other not in models.NAMES:
      raise app.UsageError(f"--rank={rank!r}: unknown model {other!r}; known: {', '.join(models.NAMES)}")
    target = models.param_count(other, num_classes=num_classes)
    r = accounting.rank_for_params(teacher_params, target, heads=_HEADS.value, rules=rules)
    return InherSpec(rank=r, heads=_HEADS.value, rules=rules)
  try:
    value = int(rank) if rank.isdigit() else float(rank)
  except ValueError:
    raise app.UsageError(f"--rank={rank!r}: expected an int, a fraction or params:<model>") from None
  return InherSpec(rank=value, heads=_HEADS.value, rules=rules)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_RANK.value is None) == (_ENERGY.value is None):
    raise app.UsageError("give exactly one of --rank and --energy")
  config = _CONFIG.value
  out = os.path.abspath(_OUT.value)
  if os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
    raise app.UsageError(f"--out={out} already holds a checkpoint; choose another directory")
  num_classes = _NUM_CLASSES.value or data.num_classes(config.data)
  name = config.teacher.model
  teacher = models.create(name, num_classes=num_classes, **dict(config.teacher.get("kwargs") or {}))
  shape = (1, *data.input_shape(config.data))
  dtype = jnp.int32 if config.data.name == "chars" else jnp.float32
  abstract = jax.eval_shape(lambda: teacher.init(jax.random.key(0), jnp.zeros(shape, dtype), train=False))
  variables = ckpt_lib.load_variables(_TEACHER.value, abstract)
  spec = _spec(variables["params"], name, num_classes)
  params, rows = inherit(variables["params"], spec, return_report=True)
  # The inherited variables, checked against the inherited model's own tree.
  student = teacher.clone(spec=spec)
  expect = jax.eval_shape(lambda: student.init(jax.random.key(0), jnp.zeros(shape, dtype), train=False))
  got = {"params": params, **({"batch_stats": variables["batch_stats"]} if "batch_stats" in variables else {})}
  jax.tree.map(lambda a, b: None, {k: expect[k] for k in got}, got)  # Same tree or raise.
  os.makedirs(out, exist_ok=True)
  mngr = ckpt_lib.manager(os.path.join(out, "checkpoints"), async_save=False)
  ckpt_lib.save(mngr, 0, got, {"teacher": os.path.abspath(_TEACHER.value), "model": name})
  mngr.wait_until_finished()
  mngr.close()
  spec_json = {"model": name, "num_classes": num_classes, "heads": spec.heads, "rank": spec.rank,
               "rules": [list(r) for r in spec.rules], "method": spec.method}
  with open(os.path.join(out, "spec.json"), "w") as f:
    json.dump(spec_json, f, indent=2, default=str)
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(rows, f, indent=2, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x))
  text = format_report(rows)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(f"# {name} inherited\n\nteacher: {_TEACHER.value}\n\n```\n{text}\n```\n")
  print(text)
  before, after = accounting.param_count(variables["params"]), accounting.param_count(params)
  print(f"teacher {before:,} parameters -> inherited {after:,} ({after / before:.1%}); written to {out}")


if __name__ == "__main__":
  app.run(main)
