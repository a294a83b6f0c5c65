"""What every dataset builder of `inhernet_jax.data.pipeline` shares: the task, the spec, sources.

A builder turns a validated data config into a `DatasetSpec`: its `Task`, random-access
train and eval sources (`Arrays` over NumPy arrays, or `tfds_source` over a prepared
TFDS split) and per-example transforms; `inhernet_jax.data.pipeline` batches it. Builders that
live in their own module (`inhernet_jax.data.fashion_mnist`) import this one, not `data`,
so `data` can import them.

Example:
  ```python
  task = Task(name="toy", kind="classification", num_classes=2, input_shape=(4,),
              input_dtype="float32", train_size=8, eval_size=8)
  rows = Arrays({"image": np.zeros((8, 4)), "label": np.zeros(8, np.int32)})
  DatasetSpec(task=task, train_source=rows, eval_source=rows,
              train_fn=lambda r, rng: {"input": r["image"], "label": r["label"]},
              eval_fn=lambda r: {"input": r["image"], "label": r["label"]}, info={})
  ```
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]
Record = Any  # One source element: a dict of arrays/scalars (images) or an int (chars).


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not prepared (as ArrayRecord) in the data directory."""


@dataclasses.dataclass(frozen=True)
class Task:
  """What a model needs to know about its data.

  Attributes:
    name: the dataset, one of `inhernet_jax.data.pipeline.NAMES`.
    kind: ``"classification"`` or ``"lm"`` (next-token prediction).
    num_classes: the number of classes, or the vocabulary size for ``"lm"``.
    input_shape: one example's input, without the batch axis.
    input_dtype: ``"float32"`` (images) or ``"int32"`` (token ids).
    train_size: training examples per epoch (windows for ``"lm"``).
    eval_size: evaluation examples (windows for ``"lm"``).
  """

  name: str
  kind: str
  num_classes: int
  input_shape: tuple[int, ...]
  input_dtype: str
  train_size: int
  eval_size: int


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSpec:
  """A dataset before batching: sources and per-example transforms.

  ``train_fn(record, rng)`` and ``eval_fn(record)`` map a source record to
  ``{"input", "label"}``. ``shuffle`` permutes the training source every epoch
  (chars draws random windows from ``rng`` instead).
  """

  task: Task
  train_source: Sequence[Record]
  eval_source: Sequence[Record]
  train_fn: Callable[[Record, np.random.Generator], Batch]
  eval_fn: Callable[[Record], Batch]
  info: Mapping[str, Any]
  shuffle: bool = True


class Arrays:
  """Random access to rows of equally long arrays: ``source[i] = {k: v[i]}``."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self._arrays = dict(arrays)
    self._length = len(next(iter(self._arrays.values())))

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self._arrays.items()}


# ------------------------------------------------------------------------- config
def check_int(value: Any, field: str, where: str, *, low: int | None = None) -> int:
  """``value`` as an int (not a bool), at least ``low``; the error names ``where.field``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{where}: {field} must be an int, got {value!r}")
  if low is not None and value < low:
    raise ValueError(f"{where}: {field} must be >= {low}, got {value!r}")
  return int(value)


def get_int(fields: dict, field: str, default: int | None, low: int) -> int | None:
  """A data config's int ``field`` (``default`` when unset or None)."""
  value = fields.get(field)
  if value is None:
    return default
  return check_int(value, field, "data config", low=low)


def get_augment(fields: dict, name: str, supported: bool) -> bool:
  """A data config's ``augment`` (default: ``supported``); True where not ``supported`` fails."""
  value = fields.get("augment")
  if value is None:
    return supported
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"data config: augment must be a bool, got {value!r}")
  if value and not supported:
    raise ValueError(f"data config: augment=True is not supported for {name} "
                     f"(only fashion_mnist, cifar10, cifar100 and imagenet2012 augment)")
  return bool(value)


# --------------------------------------------------------------------------- tfds
def default_tfds_dir() -> str:
  """TFDS's data directory (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
  from tensorflow_datasets.core import constants

  return str(constants.get_default_data_dir())


def _prepare_hint(name: str, data_dir: str) -> str:
  build = f"tfds build {name} --data_dir={data_dir} --file_format=array_record"
  if name == "imagenet2012":
    return (f"Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (image-net.org) "
            f"into {data_dir}/downloads/manual/, then run `{build}` (needs TensorFlow, only "
            f"to prepare).")
  return (f"On a machine with network access (and TensorFlow, only to prepare) run "
          f"`{build}`, then copy {data_dir}/{name} here or set config.data_dir to it.")


def tfds_source(name: str, split: str, data_dir: str | None = None) -> Sequence[dict]:
  """A prepared TFDS split as a random-access source, read without TensorFlow.

  Never downloads, never retries: TFDS is asked with ``download=False`` and
  ``try_gcs=False``.

  Raises:
    DatasetNotPreparedError: the split is not prepared as ArrayRecord in ``data_dir``
      (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``); says how to prepare it.
  """
  import tensorflow_datasets as tfds

  where = str(data_dir) if data_dir else default_tfds_dir()
  try:
    return tfds.data_source(name, split=split, data_dir=where, download=False,
                            try_gcs=False)
  except Exception as e:  # TFDS's errors for this vary (and can mislead): one of ours.
    raise DatasetNotPreparedError(
        f"{name} (split {split!r}) is not prepared as ArrayRecord in tfds data_dir {where}. "
        f"{_prepare_hint(name, where)} (tfds said: {type(e).__name__}: {e})") from e
