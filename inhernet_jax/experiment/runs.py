"""The paper's comparison in one call: teacher -> students -> InherNet, at equal epochs.

For every seed: train (or restore, or load) the teacher; then train each method the
config lists for the same number of epochs: the student from scratch, the student with
KD / DKD / FitNet hints, InherNet inherited from the teacher with the plain task loss
("Large" in the paper) and with KD from its own teacher ("Small"), optionally swept over
rank x heads. Writes ``results.json``, ``results.md`` and the plots (`report`) into the
workdir. Every run checkpoints under ``workdir/seed_<s>/<method>/``, so the whole
experiment, killed at any point, resumes where it stopped when run again.

Example:
  ```python
  config = configs.digits.get_config()
  results = experiment.train_and_evaluate(config, "/tmp/digits")
  print(results["table"])
  ```
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from inhernet_jax import models
from inhernet_jax.decomposition import accounting
from inhernet_jax.data import pipeline as data
from inhernet_jax.experiment import report
from inhernet_jax.parallel import sharding as sharding_lib
from inhernet_jax.training import checkpoint as ckpt_lib
from inhernet_jax.training import loop as train_loop
from inhernet_jax.training import trainer as train_lib
from inhernet_jax.decomposition import budget as budget_lib
from inhernet_jax.calibration import batch_stats
from inhernet_jax.calibration import grams as calibration
from inhernet_jax.training import integrity
from inhernet_jax.training import lock as lock_lib
from inhernet_jax.models import sizes
from inhernet_jax.experiment import preflight, validate
from inhernet_jax.decomposition.transform import inherit
from inhernet_jax.experiment.records import KINDS, RECALIBRATE, RECALIBRATION_BATCHES, MethodDef, RunRecord
from inhernet_jax.decomposition.spec import InherSpec

# Method fields the trainer fingerprints itself (or that do not define the run).
_TRAINER_FIELDS = ("label", "optimizer", "loss", "loss_kwargs", "hint")


def _dict(node) -> dict:
  if node is None:
    return {}
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else dict(node)


def method_names(config) -> list[str]:
  """The methods to run, in order (``config.methods``: a comma-separated string)."""
  names = [n.strip() for n in str(config.methods).split(",") if n.strip()]
  unknown = [n for n in names if n not in config.method_defs]
  if unknown:
    raise ValueError(
        f"config.methods names {unknown}, not defined in config.method_defs "
        f"(defined: {sorted(config.method_defs)})"
    )
  if not names:
    raise ValueError("config.methods is empty")
  return names


def _example(task) -> jax.Array:
  return jnp.zeros((1, *task.input_shape), task.input_dtype)


def _key(seed: int, name: str) -> jax.Array:
  # A stable per-method key (Python's hash() is salted per process).
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def create_model(model_name: str, task, kwargs) -> Any:
  """The zoo model ``model_name`` for ``task``'s classes, with the config's ``kwargs``."""
  return models.create(model_name, num_classes=task.num_classes, **_dict(kwargs))


def init_variables(model, key: jax.Array, task, config) -> dict:
  """Fresh ``{"params"[, "batch_stats"]}`` (no other collections), born sharded."""
  def init(key):  # The key as an argument: one compiled init per model, not per seed.
    variables = model.init(key, _example(task), train=False)
    return {k: v for k, v in variables.items() if k in ("params", "batch_stats")}

  variables, _ = sharding_lib.jit_init(init, mesh_from_config(config), lambda v: v["params"],
                                       config.get("sharding_rules"), key)
  return variables


def _flops(model, variables, task) -> float | None:
  try:
    return accounting.forward_flops(lambda v, x: model.apply(v, x, train=False), variables, _example(task))
  except Exception as e:  # FLOPs are informative only; never fail a run over them.
    logging.warning("FLOP count failed: %s", e)
    return None


def load_or_train_teacher(config, pipeline, workdir: str, seed: int):
  """The teacher's model and variables: loaded, or trained (and checkpointed)."""
  task = pipeline.task
  tc = config.teacher
  model = create_model(tc.model, task, tc.get("kwargs"))
  variables = init_variables(model, _key(seed, "teacher"), task, config)
  if tc.get("checkpoint"):
    status = ckpt_lib.run_status(tc.checkpoint)
    if status["finished"] is False and not config.get("allow_unfinished_teacher", False):
      raise ckpt_lib.CheckpointError(
          f"config.teacher.checkpoint {tc.checkpoint} is unfinished: its latest checkpoint is "
          f"step {status['step']} of {status['total_steps']}; finish that run, or set "
          "config.allow_unfinished_teacher=True to use it as it is")
    loaded = ckpt_lib.load_variables(tc.checkpoint, variables)
    return model, loaded, None
  run = _train(
      config, model, variables, pipeline, _with_optimizer(config, tc.get("optimizer")),
      os.path.join(workdir, "teacher"), seed=seed, epochs=tc.epochs, desc="teacher",
      # The trainer fingerprints epochs and the optimizer itself (allow_resume_changes
      # names them as it does).
      fingerprint={"teacher_config": {k: v for k, v in _dict(tc).items()
                                      if k not in ("epochs", "optimizer")}},
  )
  trained = {"params": run.state.params}
  if run.state.batch_stats:
    trained["batch_stats"] = run.state.batch_stats
  # Named before any student trains (a loaded teacher is checked by load_variables).
  ckpt_lib.check_finite(trained, f"the teacher in {os.path.join(workdir, 'teacher')}")
  return model, trained, run


def _with_optimizer(config, override):
  if not override:
    return config
  c = ml_collections.ConfigDict(config.to_dict())
  c.optimizer.update(_dict(override))
  return c


def _student_size(rank, student_params: dict[str, int], name: str,
                  num_classes: int | None = None) -> int | None:
  """The parameter count a named rank stands for (None for a number), `sizes.named_size`:
  ``'params:<method>'`` (a method run before it) or ``'student:<zoo model>'`` (that zoo
  model at the task's ``num_classes``)."""
  return sizes.named_size(rank, methods=student_params, num_classes=num_classes,
                          where=f"config.method_defs.{name}.rank")


def _resolve_rank(rank, teacher_params, heads: int, rules, student_params: dict[str, int],
                  name: str, num_classes: int | None = None, variant: str = "gated"):
  size = _student_size(rank, student_params, name, num_classes)
  if size is None:
    return rank
  return accounting.rank_for_params(teacher_params, size, heads=heads, rules=rules,
                                    variant=variant)


def _inherit_spec(md, name: str, config, t_model, t_vars, pipeline, student_params, grams_cache):
  """An InherNet method's spec, its calibration Grams (or None) and its rank to report.

  ``allocation``: ``"uniform"`` (one rank, `_resolve_rank`) or ``"greedy"`` (per-layer
  ranks at the budget ``rank`` names, `budget.allocate`; over the output-energy spectra
  when ``data_aware``). ``data_aware`` truncates every layer for its output error on
  ``calibration_batches`` training batches. (``recalibrate``, applied in `run_seed`,
  re-estimates the inherited network's BatchNorm statistics: `_recalibrate`;
  ``init_key``, default the method's key, names the key of its random gate init:
  methods that share it start from the same gates.)
  """
  heads = int(md.heads)
  rules = models.preset(md.preset, config.teacher.model)
  aware = bool(md.data_aware)
  base = InherSpec(rank=1, heads=heads, rules=rules, method=md.svd, data_aware=aware,
                   variant=md.variant)
  grams = None
  if aware:  # One set of Grams per seed and batch count, shared by the methods.
    count = int(md.calibration_batches)
    if count not in grams_cache:
      batches = (pipeline.train_batch(step) for step in range(count))
      grams_cache[count] = calibration.input_grams(t_model, t_vars, batches,
                                                   apply_kwargs={"train": False})
    grams = grams_cache[count]
  allocation = md.allocation
  t_params = t_vars["params"]
  if allocation == "uniform":
    rank = _resolve_rank(md.rank, t_params, heads, rules, student_params, name,
                         pipeline.task.num_classes, md.variant)
    return base.replace(rank=rank), grams, rank
  if allocation != "greedy":
    raise ValueError(f"config.method_defs.{name}.allocation must be 'uniform' or 'greedy', "
                     f"got {allocation!r}")
  target = sizes.parameter_budget(t_params, md.rank, methods=student_params,
                                 num_classes=pipeline.task.num_classes,
                                 where=f"config.method_defs.{name}.rank")
  spectra = None if grams is None else calibration.whitened_spectra(t_params, grams, base)
  spec = budget_lib.allocate(t_params, target, spec=base, spectra=spectra,
                             objective=md.objective)
  return spec, grams, None


def method_defs(config) -> list[tuple[str, MethodDef]]:
  """(key, `MethodDef`) pairs of the methods to run, in order; InherNet methods expanded
  over ``config.sweep``'s rank x heads (keys ``<name>_r<rank>_h<heads>``).

  Raises:
    ValueError: an unknown method, or a definition `MethodDef.from_config` rejects.
    validate.ConfigError: a rank that is not one.
  """
  out = []
  sweep = config.get("sweep") or {}
  ranks, heads = tuple(sweep.get("ranks", ()) or ()), tuple(sweep.get("heads", ()) or ())
  for name in method_names(config):
    md = MethodDef.from_config(name, config.method_defs[name])
    if md.kind == "inhernet":  # "8" from the command line (a string field) is rank 8.
      md = md.replace(rank=validate.parse_rank(md.rank, f"config.method_defs.{name}.rank"))
    if md.kind == "inhernet" and (ranks or heads) and md.sweep:
      for r in ranks or (md.rank,):
        r = validate.parse_rank(r, "config.sweep.ranks")
        for h in heads or (md.heads,):
          base = re.sub(r"\s*H=\d+", "", md.label_or(name))  # The sweep sets H.
          out.append((f"{name}_r{r}_h{h}",
                      md.replace(rank=r, heads=h, label=f"{base} r={r} H={h}")))
    else:
      out.append((name, md))
  return out


def expand_methods(config) -> list[tuple[str, dict]]:
  """`method_defs` with each definition as the dict the config wrote (`MethodDef.as_dict`:
  the given fields, the sweep's rank, heads and label, a parsed rank)."""
  return [(key, md.as_dict()) for key, md in method_defs(config)]


def mesh_from_config(config) -> jax.sharding.Mesh:
  """``config.mesh`` (``{"data": -1}`` by default) as a `sharding.make_mesh` mesh."""
  axes = config.get("mesh")
  return sharding_lib.make_mesh(_dict(axes) if isinstance(axes, ml_collections.ConfigDict) else axes)


def make_pipeline(config, seed: int, mesh):
  """``config.data``'s `data.Pipeline` for ``seed``: this process's rows on ``mesh``."""
  # This process's rows of every global batch, as the mesh lays the batch out.
  batch_size = config.batch_size
  eval_batch_size = config.get("eval_batch_size") or batch_size
  slot, slots = sharding_lib.process_batch_slot(mesh, batch_size)
  if sharding_lib.process_batch_slot(mesh, eval_batch_size) != (slot, slots):
    raise ValueError(f"config.eval_batch_size={eval_batch_size} and config.batch_size="
                     f"{batch_size} split differently over mesh {sharding_lib.describe(mesh)}")
  return data.get(config.data, batch_size=batch_size, seed=seed,
                  eval_batch_size=eval_batch_size, process_index=slot, process_count=slots)


def _train(config, *args, **kwargs):
  return train_lib.train_and_evaluate(*args, **kwargs, mesh=mesh_from_config(config),
                                      sharding_rules=config.get("sharding_rules"))


def _record(key: str, label: str, kind: str, loss: str, model, variables, run, *, seed: int,
            task, flops: dict, **extra) -> RunRecord:
  """One run's `RunRecord` (``extra``: its InherNet fields)."""
  higher = task.kind == "classification"
  h = run.history
  finals = [m for m in h["test_metric"] if m is not None]
  if key not in flops:  # One compile per method, not per seed.
    flops[key] = _flops(model, variables, task)
  return RunRecord(
      method=key, label=label, kind=kind, loss=loss, seed=seed, rank=extra.get("rank"),
      heads=extra.get("heads"), init=extra.get("init"),
      params=accounting.param_count(variables["params"]), flops=flops[key],
      metric_name=train_loop.metric_name(task.kind), higher_is_better=higher,
      metric_at_init=extra.get("metric_at_init"), final_metric=h["test_metric"][-1],
      best_metric=max(finals) if higher else min(finals), epochs_to_scratch=None,
      wall_s=run.wall_s, history=h, gates=run.gates,
      calibration_batches=extra.get("calibration_batches"))


def _recalibrate(md: MethodDef, name: str, model, variables, pipeline) -> tuple[dict, int]:
  """``(variables, batches used)``: BatchNorm statistics re-estimated on the first
  ``md.recalibration_batches`` (default 32) training batches of this seed's data order
  (`batch_stats.recalibrate_batch_stats`) unless ``md.recalibrate`` is False.

  On by default: it lifts the metric at init (BatchNorm CNNs start near chance without
  it) and cannot change fine-tuning, whose gradients use batch statistics only.
  """
  if not md.recalibrate or "batch_stats" not in variables:
    return variables, 0
  count = int(md.recalibration_batches)
  if count < 1:
    raise ValueError(f"config.method_defs.{name}.recalibration_batches must be >= 1, got {count}")
  batches = (pipeline.train_batch(step) for step in range(count))
  return batch_stats.recalibrate_batch_stats(model, variables, batches), count


def _teacher_record(config, model, variables, run, *, seed: int, task, flops: dict
                    ) -> RunRecord:
  return _record("teacher", f"teacher ({config.teacher.model})", "teacher", "ce", model,
                 variables, run, seed=seed, task=task, flops=flops)


def run_seed(config, workdir: str, seed: int, *, teacher=None, flops: dict | None = None
             ) -> list[RunRecord]:
  """Every method of the config for one seed; returns one `RunRecord` per method (it reads
  as the dict records did: ``record["final_metric"]``).

  Args:
    config: the experiment config.
    workdir: this seed's directory.
    seed: the seed of data order, initialisation and dropout.
    teacher: ``(model, variables)`` of a teacher shared by all seeds; None trains (or
      restores) this seed's own teacher under ``workdir/teacher`` and reports it.
    flops: a cache of forward FLOPs by method key, shared across seeds.
  """
  flops = {} if flops is None else flops
  pipeline = make_pipeline(config, seed, mesh_from_config(config))
  task = pipeline.task
  higher = task.kind == "classification"
  records = []
  if teacher is None:
    t_model, t_vars, t_run = load_or_train_teacher(config, pipeline, workdir, seed)
    if t_run is not None:
      records.append(_teacher_record(config, t_model, t_vars, t_run, seed=seed, task=task,
                                     flops=flops))
  else:
    t_model, t_vars = teacher
  t_params = t_vars["params"]

  student_params: dict[str, int] = {}
  grams_cache: dict[int, dict] = {}
  teacher_id = functools.cache(lambda: integrity.digest(integrity.checksum(t_vars)))
  for key, md in method_defs(config):
    loss, loss_kwargs = md.loss, _dict(md.loss_kwargs)
    hint = None
    if loss == "fitnet":
      h = _dict(md.hint)
      hint = train_lib.Hint(h["student_layer"], h["teacher_layer"], float(h.get("weight", 1.0)))
    extra = {}
    if md.kind == "student":
      model = create_model(md.model, task, md.kwargs)
      variables = init_variables(model, _key(seed, key), task, config)
      student_params[key] = accounting.param_count(variables["params"])
    else:
      spec, grams, rank = _inherit_spec(md, key, config, t_model, t_vars, pipeline, student_params,
                                        grams_cache)
      model = t_model.clone(spec=spec)
      if md.init == "svd":
        variables = dict(t_vars, params=inherit(
            t_params, spec, key=_key(seed, md.init_key or key), calibration=grams,
            sharding_rules=config.get("sharding_rules")))
      else:  # The paper's "without SVD init" ablation: same network, random init.
        variables = init_variables(model, _key(seed, md.init_key or key), task, config)
      init = md.init
      if init == "svd" and spec.data_aware:
        init = "data_aware"  # Its own panel of the rank x heads plot.
      variables, count = _recalibrate(md, key, model, variables, pipeline)
      extra = {"rank": rank, "heads": spec.heads, "init": init,
               "calibration_batches": {
                   "data_aware": int(md.calibration_batches) if spec.data_aware else 0,
                   "batch_stats": count}}
    run = _train(
        config, model, variables, pipeline, _with_optimizer(config, md.optimizer),
        os.path.join(workdir, key), seed=seed, epochs=config.epochs, loss=loss,
        loss_kwargs=loss_kwargs, teacher=(t_model, t_vars) if loss != "ce" else None,
        hint=hint, desc=f"seed {seed} {key}",
        # What defines this run beyond the trainer's own fields (its label does not), and
        # the teacher an inherited network starts from (also without a KD teacher).
        # (The definition as the config wrote it: defaults left out, as they always were.)
        fingerprint={"method": md.as_dict(exclude=_TRAINER_FIELDS),
                     **({"teacher": teacher_id()} if md.kind == "inhernet" else {})},
    )
    if md.kind == "inhernet":
      extra["metric_at_init"] = run.history["test_metric"][0]
    final = {"params": run.state.params}
    if run.state.batch_stats:  # The FLOP count runs the model: BatchNorm needs its stats.
      final["batch_stats"] = run.state.batch_stats
    records.append(_record(key, md.label_or(key), md.kind, md.loss, model, final, run,
                           seed=seed, task=task, flops=flops, **extra))

  scratch = next((r for r in records if r.method == config.get("scratch_method", "student")), None)
  if scratch is not None:
    records = [r if r.kind == "teacher" else dataclasses.replace(
        r, epochs_to_scratch=report.epochs_to_reach(r.history, scratch.final_metric, higher))
               for r in records]
  return records


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs every seed of the experiment and writes the report into ``workdir``.

  Returns:
    ``{"runs": [...], "summary": [...], "table": markdown, "files": {...}}``.

  Raises:
    validate.ConfigError: the config cannot run (`preflight.check_run`: checked before
      anything trains, the workdir included).
    lock.WorkdirBusy: another process is running in ``workdir``.
    checkpoint.CheckpointError: a run's checkpoint belongs to another run (its
      differing settings are listed) or is damaged beyond its previous step.
  """
  preflight.check_run(config, workdir)
  # One writer per workdir (process 0 speaks for a multi-process job).
  with lock_lib.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  seeds = [config.seed + i for i in range(int(config.seeds))]
  if not seeds:
    raise ValueError(f"config.seeds must be >= 1, got {config.seeds}")
  t0 = time.perf_counter()
  runs, flops, shared = [], {}, None
  mesh = mesh_from_config(config)
  logging.info("mesh: %s", sharding_lib.describe(mesh))
  pipeline = make_pipeline(config, config.seed, mesh)
  if jax.process_index() == 0:  # Which data this was (the chars corpus differs by Python).
    report.write_json(os.path.join(workdir, "data_info.json"), dict(pipeline.info))
  if not config.get("teacher_per_seed", False):
    # One teacher (trained with config.seed, in its seed directory) for every seed.
    t_model, t_vars, t_run = load_or_train_teacher(
        config, pipeline, os.path.join(workdir, f"seed_{config.seed}"), config.seed)
    shared = (t_model, t_vars)
    if t_run is not None:
      runs.append(_teacher_record(config, t_model, t_vars, t_run, seed=config.seed,
                                  task=pipeline.task, flops=flops))
  for seed in seeds:
    runs += run_seed(config, os.path.join(workdir, f"seed_{seed}"), seed, teacher=shared,
                     flops=flops)
  summary = report.summarize(runs)
  table = report.markdown_table(summary, runs[0].metric_name, runs[0].higher_is_better)
  files = {}
  if jax.process_index() == 0:
    files = report.write_report(runs, workdir, title=config.get("name", "experiment"))
  logging.info("experiment done in %.1f s", time.perf_counter() - t0)
  # The runs as the dicts of results.json (users index, change and serialise them).
  return {"runs": [r.to_json() for r in runs], "summary": summary, "table": table,
          "files": files}
