"""Shared config pieces: `parse_arg` for ``file.py:key=value,...`` and trainer defaults.

Example::

  arg = parse_arg("variant=local,seeds=1", variant="default", seeds=3)
  arg.variant, arg.seeds    # "local", 1 (typed like the default)
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """big_vision-style config argument: ``"local"`` or ``"variant=local,seeds=1"``.

  A bare word sets the first default (the variant). Values are converted to the type of
  their default (bools accept true/false/1/0). Unknown keys are an error.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  first = next(iter(defaults))
  for item in arg.split(","):
    key, sep, value = item.partition("=")
    if not sep:
      key, value = first, item
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)} (got {arg!r})")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r}: expected true or false")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, (int, float)):
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise ValueError(f"config argument {key}={value!r}: expected "
                         f"{type(default).__name__}") from None
    else:
      out[key] = value
  return out


def base(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """Trainer and experiment defaults every config starts from."""
  c = config or ml_collections.ConfigDict()
  c.name = "experiment"
  c.seed = 0
  c.seeds = 1                      # Seeds seed, seed+1, ...; the report gives mean +- std.
  c.teacher_per_seed = False       # False: one teacher (trained with `seed`) for all seeds.
  c.eval_batch_size = 256
  c.compute_dtype = "float32"      # "bfloat16": bf16 forward/backward, float32 master params.
  c.checkpoint_every_steps = 200   # Plus one at every epoch end.
  c.keep_checkpoints = 2
  c.async_checkpoints = True
  # A run resumes only from a checkpoint of the same run (same fingerprint: optimizer,
  # epochs, model, teacher, data...). Comma-separated fields that may differ, e.g.
  # "epochs" to extend a finished run deliberately; "*": any.
  c.allow_resume_changes = ""
  c.allow_unfinished_teacher = False  # teacher.checkpoint of a run that did not finish.
  c.log_every_steps = 0            # absl logging of step metrics (0: epochs only).
  c.progress = True                # tqdm progress bars.
  c.scratch_method = "student"     # "Epochs to reach" is measured against this run.
  c.sweep = ml_collections.ConfigDict({"ranks": (), "heads": ()})
  # Device mesh (inhernet_jax.parallel.sharding): -1 takes the devices the other axes leave.
  # --config.mesh.fsdp=8 shards params and optimizer state; --config.mesh.model=4 (with
  # sharding_rules="tensor_parallel") splits the transformers' layers.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  c.sharding_rules = "default"     # A sharding.RULE_SETS name, or ((regex, action), ...).
  return c


def imagenet_run(c: ml_collections.ConfigDict, arg: ml_collections.ConfigDict,
                 eval_batch_size: int) -> None:
  """Sets what the ImageNet-1k configs share: tfds ``imagenet2012`` at 224 with the
  standard augmentation, ``arg``'s seeds, batch and epochs, bfloat16 compute, a checkpoint
  every 1000 steps and a log line every 100."""
  c.seeds = arg.seeds
  c.data = ml_collections.ConfigDict(
      {"name": "imagenet2012", "data_dir": "", "augment": True, "image_size": 224})
  c.batch_size = arg.batch
  c.eval_batch_size = eval_batch_size
  c.epochs = arg.epochs
  c.compute_dtype = "bfloat16"
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100


def kd_methods(student: str, student_kwargs: dict, *, kd: dict, dkd: dict, hint: dict,
               heads: int, label: str) -> dict:
  """The comparison's method table: students (scratch, KD, DKD, FitNet) and InherNet.

  InherNet's rank is ``params:student``: the largest uniform rank whose inherited
  network has no more parameters than the student.
  """
  student_def = {"kind": "student", "model": student, "kwargs": student_kwargs}
  inherit_def = {"kind": "inhernet", "rank": "params:student", "heads": heads, "preset": "default"}
  return {
      "student": {**student_def, "loss": "ce", "label": f"{label} from scratch"},
      "student_kd": {**student_def, "loss": "kd", "loss_kwargs": kd, "label": f"{label} + KD"},
      "student_dkd": {**student_def, "loss": "dkd", "loss_kwargs": dkd, "label": f"{label} + DKD"},
      "student_fitnet": {**student_def, "loss": "fitnet", "hint": hint,
                         "label": f"{label} + FitNet"},
      "inherit": {**inherit_def, "loss": "ce", "label": f"InherNet H={heads}"},
      "inherit_kd": {**inherit_def, "loss": "kd", "loss_kwargs": kd,
                     "label": f"InherNet H={heads} + KD"},
      # The paper's ablation: the inherited architecture without the teacher's weights.
      "inherit_random": {**inherit_def, "init": "random", "loss": "ce",
                         "label": f"InherNet H={heads}, random init"},
      # Beyond the paper (the ``beyond`` variants): truncation for the layers' output
      # error on 8 training batches, and per-layer ranks at the same budget.
      "inherit_aware": {**inherit_def, "loss": "ce", "data_aware": True,
                        "label": f"InherNet H={heads}, data-aware"},
      "inherit_greedy": {**inherit_def, "loss": "ce", "allocation": "greedy",
                         "objective": "param_energy", "label": f"InherNet H={heads}, per-layer ranks"},
      "inherit_greedy_aware": {**inherit_def, "loss": "ce", "allocation": "greedy",
                               "objective": "param_energy", "data_aware": True,
                               "label": f"InherNet H={heads}, per-layer ranks, data-aware"},
  }


def student_and_inherit_methods(student: str, student_kwargs: dict, *, heads: int,
                                kd: dict) -> dict:
  """The large-scale comparisons' method table (ImageNet, ViT): the student from
  scratch and with KD, InherNet at the student's size with CE and with KD."""
  student_def = {"kind": "student", "model": student, "kwargs": student_kwargs}
  inherit_def = {"kind": "inhernet", "rank": "params:student", "heads": heads, "preset": "default"}
  label = f"InherNet H={heads} ({student} size)"
  return {
      "student": {**student_def, "loss": "ce", "label": f"{student} from scratch"},
      "student_kd": {**student_def, "loss": "kd", "loss_kwargs": kd, "label": f"{student} + KD"},
      "inherit": {**inherit_def, "loss": "ce", "label": label},
      "inherit_kd": {**inherit_def, "loss": "kd", "loss_kwargs": kd, "label": f"{label} + KD"},
  }

