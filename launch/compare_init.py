r"""Inherited networks before fine-tuning: data-aware vs plain, per-layer vs uniform ranks.

For a trained teacher (restored from ``WORKDIR/seed_<seed>/teacher``, trained there
first if absent, exactly as `launch.main` does), prints and writes ``compare_init.json``:

1. **Data-aware vs plain at equal rank**, for each ``--ranks``: the relative output
   error ``||X (A - A_r)|| / ||X A||`` of every inherited layer on *held-out* inputs
   (Grams of the eval split, `calibration.input_grams`; the data-aware truncation is
   fitted on ``--calibration_batches`` training batches), and the network's metric.
2. **Per-layer vs uniform ranks at the student's budget** (the config's ``student``
   method): `budget.uniform` and `budget.allocate` over the weights' spectra and over
   the data-aware output spectra (`calibration.whitened_spectra`), parameters and metric.

For a teacher with BatchNorm every metric is also given with the inherited network's
BatchNorm statistics re-estimated on ``--recalibration_batches`` training batches
(`batch_stats.recalibrate_batch_stats`): plain and data-aware, each with and without.

Nothing is fine-tuned here; the ``beyond`` config variants fine-tune the same methods
(`configs/digits.py:variant=beyond`).

  python -m launch.compare_init --config=configs/digits.py:divisor=4 --workdir=workdir/digits
  python -m launch.compare_init --config=configs/chars.py --workdir=workdir/chars --ranks=8,16
  python -m launch.compare_init --config=configs/fashion_mnist.py:bn --workdir=workdir/fmnist_bn \
      --ranks=4,8,16 --recalibration_batches=32

Installed (``pip install``), the same command is ``inhernet-compare-init``, with the same
flags.
"""

import json
import os

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from inhernet_jax import models
from inhernet_jax.decomposition import accounting
from inhernet_jax.decomposition import budget
from inhernet_jax.calibration import batch_stats
from inhernet_jax.calibration import grams as calibration
from inhernet_jax.experiment import runs as experiment
from inhernet_jax.training import loop as train_loop
from inhernet_jax.training import trainer as train_lib
from inhernet_jax.decomposition.transform import inherit
from inhernet_jax.experiment.records import MethodDef
from inhernet_jax.decomposition.spec import InherSpec
from inhernet_jax.experiment import preflight
from . import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "The experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The experiment's directory (teacher inside).")
_RANKS = flags.DEFINE_list("ranks", ["4", "8"], "Uniform ranks of the data-aware comparison.")
_BATCHES = flags.DEFINE_integer("calibration_batches", 8, "Training batches for the Grams.")
_RECAL = flags.DEFINE_integer(
    "recalibration_batches", 32, "Training batches for the BatchNorm re-estimation of every "
    "row (also reported without it); 0: none. Only for networks with BatchNorm.")
flags.mark_flags_as_required(["config", "workdir"])


def _metric(model, variables, pipeline) -> float:
  kind = pipeline.task.kind
  step = jax.jit(train_lib.make_eval_step(model, kind))
  return train_loop.evaluate(step, variables["params"], variables.get("batch_stats"), pipeline, kind)[1]


def _held_out(pipeline):
  """Eval batches without their padding rows (they would count as inputs)."""
  for batch in pipeline.eval_batches():
    mask = np.asarray(batch["mask"], bool)
    yield batch["input"][mask.reshape(mask.shape[0], -1).any(-1)]


def _mean_error(teacher_params, params, grams) -> float:
  errors = calibration.inherited_output_errors(teacher_params, params, grams)
  return float(np.mean([np.mean(e) for e in errors.values()]))


def check(config, workdir: str) -> None:
  """The flags, the whole config and the workdir, before anything trains or loads.

  Raises:
    app.UsageError, validate.ConfigError: naming the flag or field and what was expected.
  """
  bad = [r for r in _RANKS.value if not r.strip().isdigit() or int(r) < 1]
  if bad or not _RANKS.value:
    raise app.UsageError(f"--ranks={','.join(_RANKS.value)}: expected a comma-separated list "
                         f"of ints >= 1 (bad: {bad})")
  if _BATCHES.value < 1:
    raise app.UsageError(f"--calibration_batches={_BATCHES.value}: expected an int >= 1")
  if _RECAL.value < 0:
    raise app.UsageError(f"--recalibration_batches={_RECAL.value}: expected an int >= 0 "
                         "(0: none)")
  preflight.check_run(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = cli.load_config(_CONFIG)  # A missing config file: one line, not a traceback.
  with cli.quiet():  # Its one-line error first, if any.
    check(config, _WORKDIR.value)
  seed = config.seed
  pipeline = experiment.make_pipeline(config, seed, experiment.mesh_from_config(config))
  t_model, t_vars, _ = experiment.load_or_train_teacher(
      config, pipeline, os.path.join(_WORKDIR.value, f"seed_{seed}"), seed)
  t_params = t_vars["params"]
  name = config.teacher.model
  md = MethodDef.from_config("inherit", config.method_defs.inherit)
  heads, rules = int(md.heads), models.preset(md.preset, name)
  calib = calibration.input_grams(
      t_model, t_vars, (pipeline.train_batch(s) for s in range(_BATCHES.value)),
      apply_kwargs={"train": False})
  held = calibration.input_grams(t_model, t_vars, _held_out(pipeline), apply_kwargs={"train": False})
  result = {"config": config.get("name"), "teacher_metric": _metric(t_model, t_vars, pipeline),
            "metric": train_loop.metric_name(pipeline.task.kind), "equal_rank": [], "budget": []}
  recalibrate = _RECAL.value > 0 and bool(t_vars.get("batch_stats"))

  def recalibrated(model, variables):
    """Its BatchNorm statistics re-estimated on this seed's first training batches."""
    batches = (pipeline.train_batch(s) for s in range(_RECAL.value))
    return batch_stats.recalibrate_batch_stats(model, variables, batches)

  if recalibrate:
    result["recalibration_batches"] = _RECAL.value
    result["teacher_metric_recalibrated"] = _metric(t_model, recalibrated(t_model, t_vars),
                                                    pipeline)

  def row(spec, **extra):
    params = inherit(t_params, spec, calibration=calib if spec.data_aware else None)
    variables = dict(t_vars, params=params)
    model = t_model.clone(spec=spec)
    out = {**extra, "params": accounting.param_count(params),
           "output_error": _mean_error(t_params, params, held),
           "metric": _metric(model, variables, pipeline)}
    if recalibrate:
      out["metric_recalibrated"] = _metric(model, recalibrated(model, variables), pipeline)
    return out

  for rank in (int(r) for r in _RANKS.value):
    spec = InherSpec(rank=rank, heads=heads, rules=rules)
    for aware in (False, True):
      result["equal_rank"].append(row(spec.replace(data_aware=aware), rank=rank, data_aware=aware))

  student_md = MethodDef.from_config("student", config.method_defs.student)
  student = experiment.create_model(student_md.model, pipeline.task, student_md.kwargs)
  target = accounting.param_count(experiment.init_variables(
      student, jax.random.key(0), pipeline.task, config)["params"])
  base = InherSpec(rank=1, heads=heads, rules=rules)
  spectra = calibration.whitened_spectra(t_params, calib, base)
  specs = {"uniform": budget.uniform(t_params, target, spec=base),
           "greedy": budget.allocate(t_params, target, spec=base),
           "greedy, output spectra": budget.allocate(t_params, target, spec=base, spectra=spectra)}
  for label, spec in specs.items():
    result["budget"].append(row(spec, allocation=label, budget=target))
  if jax.process_index() == 0:
    _print(result)
    out = os.path.join(_WORKDIR.value, "compare_init.json")
    with open(out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {out}")


def _print(result) -> None:
  m = result["metric"]
  recal = "recalibration_batches" in result
  teacher = f"{result['config']}: teacher {m} {result['teacher_metric']:.4f}"
  if recal:
    teacher += (f" ({result['teacher_metric_recalibrated']:.4f} with its BatchNorm statistics "
                f"re-estimated on {result['recalibration_batches']} training batches)")
  print(teacher)
  extra = f" | {m} with BN re-estimated |" if recal else " |"

  def cells(r):
    return f" {r['metric']:.4f} |" + (f" {r['metric_recalibrated']:.4f} |" if recal else "")

  print(f"| rank | truncation | held-out output error | {m} before fine-tuning{extra}")
  print("|---:|---|---:|---:|" + ("---:|" if recal else ""))
  for r in result["equal_rank"]:
    print(f"| {r['rank']} | {'data-aware' if r['data_aware'] else 'plain'} | "
          f"{r['output_error']:.3f} |{cells(r)}")
  print(f"\n| allocation at {result['budget'][0]['budget']:,} params | params | "
        f"held-out output error | {m} before fine-tuning{extra}")
  print("|---|---:|---:|---:|" + ("---:|" if recal else ""))
  for r in result["budget"]:
    print(f"| {r['allocation']} | {r['params']:,} | {r['output_error']:.3f} |{cells(r)}")


if __name__ == "__main__":
  cli.run(main, interrupted="run the same command again: a trained teacher is restored")
