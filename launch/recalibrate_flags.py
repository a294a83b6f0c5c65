"""BatchNorm re-estimation flags, shared by `launch.inherit` and `launch.convert`.

``--recalibrate`` re-estimates every BatchNorm's running statistics of the inherited
network (`inhernet_jax.calibration.batch_stats.recalibrate_batch_stats`, PyTorch's ``momentum=None``
estimate) on the first ``--recalibration_batches`` training batches of the experiment
config's data (``config.data``, ``config.batch_size``, data order of ``config.seed``).
Unset (the default), it is on whenever the network has BatchNorm statistics and a data
config is given: re-estimation never hurt the fine-tuned metric and lifts the metric
before fine-tuning from near chance (README, "BatchNorm re-estimation").
``--norecalibrate`` keeps the teacher's statistics.
"""

from __future__ import annotations

from absl import app, flags

from inhernet_jax.calibration import batch_stats

from inhernet_jax.calibration import grams as calibration
from inhernet_jax.data import pipeline as data

RECALIBRATE = flags.DEFINE_bool(
    "recalibrate", None, "Re-estimate the inherited network's BatchNorm statistics on training "
    "batches of the config's data (default: when it has BatchNorm and a config is given).")
BATCHES = flags.DEFINE_integer("recalibration_batches", 32,
                               "Training batches for the BatchNorm re-estimation.")


def check(config) -> None:
  """The flags checked before anything is loaded (``--recalibration_batches`` >= 1 unless
  ``--norecalibrate``; ``--recalibrate`` needs a config).

  Raises:
    app.UsageError: naming the flag and what was expected.
  """
  if RECALIBRATE.value is True and config is None:
    raise app.UsageError("--recalibrate needs --config: its data config gives the "
                         "calibration batches")
  if RECALIBRATE.value is not False and BATCHES.value < 1:
    raise app.UsageError(f"--recalibration_batches={BATCHES.value}: expected an int >= 1 "
                         "(or --norecalibrate)")


def maybe_recalibrate(model, variables, config) -> tuple[dict, str | None]:
  """``(variables, note)``: re-estimated as the flags say; ``note`` says on what (None
  when nothing was re-estimated).

  Raises:
    app.UsageError: ``--recalibrate`` without a data config, or a bad batch count or
      data config (naming the flag or field).
  """
  wanted = RECALIBRATE.value
  has_bn = bool(variables.get("batch_stats"))
  if wanted is False or (wanted is None and (config is None or not has_bn)):
    return variables, None
  if config is None:
    raise app.UsageError("--recalibrate needs --config: its data config gives the "
                         "calibration batches")
  if not has_bn:
    return variables, None  # Nothing to re-estimate (no BatchNorm).
  count = BATCHES.value
  if count < 1:
    raise app.UsageError(f"--recalibration_batches must be >= 1, got {count}")
  try:
    pipeline = data.get(config.data, batch_size=config.batch_size, seed=config.get("seed", 0))
  except (TypeError, ValueError, FileNotFoundError) as e:
    raise app.UsageError(f"--recalibrate: the config's data: {e}") from None
  batches = (pipeline.train_batch(step) for step in range(count))
  out = batch_stats.recalibrate_batch_stats(model, variables, batches)
  note = (f"BatchNorm statistics re-estimated on {count} training batches of "
          f"{count * config.batch_size:,} {pipeline.task.name} images")
  return out, note
